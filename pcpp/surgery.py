"""Model surgery: `binarize_(model, spec)`, the one way to binarize a model (torchao's quantize_ pattern).

Modules are chosen by name patterns (fnmatch; a pattern also covers the children of a matched module,
so "layer2" or "blocks.3.attn" selects a whole block). nn.Conv2d and nn.Linear leaves are swapped
for BinaryConv2d / BinaryLinear in place, keeping parameter names. By default the first layer (conv /
patch embedding) and every classifier head stay in full precision: timm's pretrained_cfg names them
(`first_conv`, `classifier`: one name, a nested name, or a tuple of names such as DeiT's ('head',
'head_dist')); a name of a container means its first conv / last classifier layer. For ViT / DeiT / Swin
the spec can add one LayerNorm at the end of each attention block (the paper's section 4.3, protocol 2).

BWA / BWAA: `activation_placement` (pcpp.placement) decides where the binarized activations get a signed
input; it is recorded in every layer's binary_config and in the report.

Mixed binarization: `keep_fp` keeps modules in full precision, by patterns (`["layer3.2"]`), or by a policy
over a sensitivity scan (`{from_sensitivity: K}`, `{budget_bytes: N}`, `{budget_ratio: R}`) that
pcpp.mixed.resolve turns into patterns before binarize_ sees the spec.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from torch import nn

from pcpp import placement as _placement
from pcpp.calibration import BalanceReport, UncalibratedThresholdsWarning, prepare_activations_
from pcpp.layers import ACCUMULATOR_BITS, BINARY_TYPES, SCALINGS, UNITS, BinaryMixin, make_quantizer
from pcpp.tasks import task_of

DEFAULT_PLACEMENT = _placement.AUTO  # hardtanh where the model defines it, threshold elsewhere
GUARDS = ("error", "warn")
# keep_fp policies: exactly one of these keys, with what it takes (pcpp.mixed resolves them)
KEEP_FP_POLICIES = {"from_sensitivity": "an integer K >= 0 (the K most sensitive blocks)",
                    "budget_bytes": "an integer N >= 1 (exported file at most N bytes)",
                    "budget_ratio": "a number R > 0 (exported file at least R times smaller than fp32)"}
# options beside the policy: the scan's column that ranks the blocks, the export precision a budget is priced at
KEEP_FP_OPTIONS = ("by", "precision")
RANKINGS = ("drop_ptb", "drop_bat")  # pcpp.sensitivity.scan's columns


def is_keep_fp_policy(keep_fp) -> bool:
    """True for a keep_fp policy (a mapping), False for patterns (a list)."""
    return isinstance(keep_fp, dict)


def check_keep_fp(keep_fp) -> list[str] | dict:
    """`keep_fp` validated: a pattern or a list of patterns (returned as a list), or a policy mapping with
    exactly one key of KEEP_FP_POLICIES and optionally `by` / `precision` (KEEP_FP_OPTIONS), returned as a
    new dict. ValueError naming the bad key or value and the valid ones."""
    if keep_fp is None:
        return []
    if isinstance(keep_fp, str):
        return [keep_fp]
    if isinstance(keep_fp, (list, tuple)):
        bad = [p for p in keep_fp if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"keep_fp patterns must be non-empty module-name strings, got {bad[0]!r} in "
                             f"{list(keep_fp)}")
        return list(keep_fp)
    if not isinstance(keep_fp, dict):
        raise ValueError(f"keep_fp must be a list of module-name patterns or a policy mapping, got {keep_fp!r}; "
                         f"policies: {_policy_help()}")
    valid = [*KEEP_FP_POLICIES, *KEEP_FP_OPTIONS]
    unknown = sorted(set(keep_fp) - set(valid), key=str)
    if unknown:
        raise ValueError(f"unknown keep_fp key(s) {unknown}; valid: {', '.join(valid)} ({_policy_help()})")
    chosen = [k for k in KEEP_FP_POLICIES if k in keep_fp]
    if len(chosen) != 1:
        raise ValueError(f"keep_fp policy {keep_fp!r} must give exactly one of {', '.join(KEEP_FP_POLICIES)}; "
                         f"got {len(chosen)} ({_policy_help()})")
    key, value = chosen[0], keep_fp[chosen[0]]
    integral = isinstance(value, int) and not isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"from_sensitivity": integral and value >= 0, "budget_bytes": integral and value >= 1,
          "budget_ratio": number and value > 0 and value == value}[key]
    if not ok:
        raise ValueError(f"keep_fp {key} must be {KEEP_FP_POLICIES[key]}, got {value!r}")
    if "by" in keep_fp and keep_fp["by"] not in RANKINGS:
        raise ValueError(f"unknown keep_fp by {keep_fp['by']!r}; valid: {', '.join(RANKINGS)}")
    if "precision" in keep_fp:
        from pcpp.export import check_precision  # pcpp.export imports this module

        check_precision(keep_fp["precision"], "keep_fp precision")
    return dict(keep_fp)


def _policy_help() -> str:
    return "policies: " + "; ".join(f"{k}: {v}" for k, v in KEEP_FP_POLICIES.items())


@dataclass
class BinarizeSpec:
    """What to binarize and how. Round-trips through `to_dict` / `from_dict` (unknown keys refused).

    BWA / BWAA only: `activation_placement` (pcpp.placement) decides where each binarized activation gets
    a signed input; `activation_guard` says what the activation-balance guard does with a layer whose
    inputs fall >= 99% on one side ("error": refuse, "warn": report it and go on).
    """

    weight: str | dict = "bnn++"
    activation: str | dict | None = None
    scaling: str = "layer"
    units: str = "scaled"
    accumulator_bits: int | None = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    keep_first: bool = True
    keep_head: bool = True
    extra_layernorm: bool = False
    activation_placement: str = DEFAULT_PLACEMENT
    activation_guard: str = "error"
    # Modules kept in full precision: patterns, or a policy over the sensitivity scan (check_keep_fp). Empty,
    # it is meant to stay out of stage keys and run directories (metadata read by stages.config.keyed_dict),
    # so that the specs written before it keep their keys.
    keep_fp: str | list[str] | dict = field(default_factory=list, metadata={"omit_empty": True})
    # field -> role of the quantizer specs (pcpp.specs.make_quantizer): stage keys hash them as they resolve
    QUANTIZER_ROLES: ClassVar[dict[str, str]] = {"weight": "weight", "activation": "activation"}

    def __post_init__(self):
        if self.activation_guard not in GUARDS:
            raise ValueError(f"unknown activation_guard {self.activation_guard!r}; valid: {', '.join(GUARDS)}")
        if self.activation_placement not in _placement.SPEC_PLACEMENTS:
            raise ValueError(f"unknown activation_placement {self.activation_placement!r}; "
                             f"valid: {', '.join(_placement.SPEC_PLACEMENTS)}")
        if self.activation is None:  # BW: a setting of the binarized activations would be ignored silently
            unused = [f"{k}={v!r}" for k, v, default in (
                ("activation_placement", self.activation_placement, DEFAULT_PLACEMENT),
                ("activation_guard", self.activation_guard, "error")) if v != default]
            if unused:
                raise ValueError(f"{' and '.join(unused)} set without binarized activations (activation is None, "
                                 f"task BW): set activation to a pair (e.g. 'bnn++') for BWA / BWAA, or drop it")
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; valid: {', '.join(SCALINGS)}")
        if self.units not in UNITS:
            raise ValueError(f"unknown units {self.units!r}; valid: {', '.join(UNITS)}")
        if self.accumulator_bits not in ACCUMULATOR_BITS:
            raise ValueError(f"unknown accumulator_bits {self.accumulator_bits!r}; valid: None, 8")
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.keep_fp = check_keep_fp(self.keep_fp)
        make_quantizer(self.weight)  # validates names and parameters now, before any surgery
        make_quantizer(self.activation, "activation")

    @property
    def task(self) -> str:
        """The paper's task name: BW, BWA or BWAA (pcpp.tasks)."""
        return task_of(self.activation, self.accumulator_bits)

    def layer_kwargs(self, placement: str | None = None) -> dict:
        """Layer constructor arguments; `placement`: the resolved one (pcpp.placement.resolve) for "auto"."""
        placement = placement or self.activation_placement
        if placement == _placement.AUTO:
            raise ValueError("activation_placement 'auto' is resolved per model: pass "
                             "pcpp.placement.resolve(model, spec.activation_placement)")
        return dict(weight_quantizer=self.weight, act_quantizer=self.activation, scaling=self.scaling,
                    units=self.units, accumulator_bits=self.accumulator_bits, activation_placement=placement)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BinarizeSpec:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown binarization keys {unknown}; valid: {', '.join(valid)}")
        return cls(**d)


@dataclass
class ReportRow:
    name: str
    kind: str
    action: str  # "binarized" or "kept (<reason>)"
    params: int


@dataclass
class SurgeryReport:
    """Per module: binarized or kept and why, with parameter counts."""

    rows: list[ReportRow]
    added_norms: list[str]
    spec: BinarizeSpec
    activation_layout: dict = field(default_factory=dict)  # pcpp.placement.apply_'s record, if rewired
    activation_placement: str | None = None  # the placement resolved for this model (BWA / BWAA)
    balance: BalanceReport | None = None  # the activation-balance guard's table, when calibration was given

    @property
    def binarized(self) -> list[str]:
        return [r.name for r in self.rows if r.action == "binarized"]

    @property
    def kept(self) -> list[str]:
        return [r.name for r in self.rows if r.action != "binarized"]

    @property
    def binary_params(self) -> int:
        return sum(r.params for r in self.rows if r.action == "binarized")

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [6])
        chosen = self.spec.activation_placement
        if self.activation_placement and self.activation_placement != chosen:
            chosen = f"{chosen} -> {self.activation_placement}"
        placement = f", activation_placement={chosen}" if self.spec.activation else ""
        lines = [f"binarization ({self.spec.task}, weight={_qname(self.spec.weight)}, "
                 f"activation={_qname(self.spec.activation)}{placement}, scaling={self.spec.scaling})",
                 f"{'module':<{w}}  {'type':<8}  {'params':>10}  action", "-" * (w + 40)]
        lines += [f"{r.name:<{w}}  {r.kind:<8}  {r.params:>10,}  {r.action}" for r in self.rows]
        total = sum(r.params for r in self.rows)
        lines.append(f"{len(self.binarized)} of {len(self.rows)} layers binarized: {self.binary_params:,} of "
                     f"{total:,} layer parameters")
        if self.added_norms:
            lines.append(f"extra LayerNorm after {len(self.added_norms)} attention blocks")
        if self.activation_layout.get("changed"):
            lines.append(f"signed inputs ({self.activation_layout['placement']}): "
                         f"{', '.join(self.activation_layout['changed'])}")
        return "\n".join(lines)


def _qname(spec) -> str:
    return "none" if spec is None else spec if isinstance(spec, str) else spec.get("name", "?")


def matches(name: str, patterns: list[str]) -> bool:
    """Whether module `name` is selected by a pattern (fnmatch), itself or as a child of a selected module."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


_matches = matches


def _names(value) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _resolve(model: nn.Module, name: str, layers: list[str], last: bool) -> list[str] | None:
    """The layer `name` means: itself, or its container's first (last) layer; [] for a module with no
    layer (an nn.Identity head); None when the model has no module of that name."""
    if name in layers:
        return [name]
    try:
        model.get_submodule(name)
    except AttributeError:
        return None
    inner = [n for n in layers if n.startswith(name + ".")]
    return [inner[-1] if last else inner[0]] if inner else []


def default_kept(model: nn.Module, leaves: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Layers kept in full precision by default: {name: "first layer" | "head"}.

    timm's pretrained_cfg names the first conv(s) (`first_conv`) and the classifier(s) (`classifier`):
    one name, a nested name ("head.fc"), or a tuple of names (DeiT distilled: ("head", "head_dist")).
    A named container stands for its first conv / last Conv2d-Linear layer. When the config names
    nothing (or nothing the model has), the first / last parameterised leaf stands in.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = [n for n, _ in leaves]
    layers = [n for n, m in leaves if type(m) in BINARY_TYPES or isinstance(m, BinaryMixin)]
    kept: dict[str, str] = {}
    for key, reason, last in (("first_conv", "first layer", False), ("classifier", "head", True)):
        found = [_resolve(model, n, layers, last) for n in _names(cfg.get(key))]
        if not any(f is not None for f in found):  # nothing named, or names this model does not have
            found = [names[-1:] if last else names[:1]]
        for f in found:
            for n in f or []:
                kept.setdefault(n, reason)
    return kept


def first_and_head(model: nn.Module, leaves: list[tuple[str, nn.Module]]) -> tuple[str, ...]:
    """Names of the layers kept in full precision by default: the first layer(s), then the head(s)."""
    return tuple(default_kept(model, leaves))


def _apply_extra_norm(module, inputs, output):
    return module.extra_norm(output)


def add_attention_norm(attn: nn.Module) -> None:
    """Append a LayerNorm to an attention block's output, as a new submodule `extra_norm`.

    A forward hook applies it, so no existing parameter is renamed and teacher state dicts still load.
    """
    proj = attn.proj
    attn.extra_norm = nn.LayerNorm(proj.out_features, device=proj.weight.device, dtype=proj.weight.dtype)
    attn.register_forward_hook(_apply_extra_norm)


def _attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules (ViT / DeiT / Swin) with an output `proj` Linear and no extra norm yet."""
    return [(n, m) for n, m in model.named_modules()
            if "attention" in type(m).__name__.lower() and isinstance(getattr(m, "proj", None), nn.Linear)
            and not hasattr(m, "extra_norm")]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def binarize_(model: nn.Module, spec: BinarizeSpec | dict | None = None, *,
              calibration: Iterable | None = None) -> SurgeryReport:
    """Binarize `model` in place following `spec`; returns the report of what changed.

    Raises ValueError, before any change to the model, for a pattern that matches nothing, a layer type
    that cannot be binarized, or a spec that cannot fit a layer (named: e.g. a ReAct `channels` that is
    not the layer's input channels, a placement the model does not define).

    calibration: for BWA / BWAA, a few batches (input tensors or (inputs, labels) pairs, normalised as the
    model expects). The thresholds are calibrated on them (pcpp.calibration.calibrate_thresholds_), then
    the guard checks the first one (check_activation_balance, limit 0.99); its table is the report's
    `balance`. With activation_guard="error" a refused layer raises ValueError naming it, after the
    surgery (the model is binarized); with "warn" the refused layers are in `balance.refused`.

    keep_fp patterns keep the layers they match in full precision ("kept (keep_fp)"); a keep_fp policy
    (a mapping) is a ValueError here: pcpp.mixed.resolve turns it into patterns against a sensitivity scan.
    """
    if spec is None:
        spec = BinarizeSpec()
    elif isinstance(spec, dict):
        spec = BinarizeSpec.from_dict(spec)
    if is_keep_fp_policy(spec.keep_fp):
        raise ValueError(f"keep_fp {spec.keep_fp} is a policy over a sensitivity scan: resolve it into patterns "
                         "first (pcpp.mixed.resolve; a pipeline's train stage does it from the sensitivity stage's "
                         "artifact), or give keep_fp as module-name patterns")

    all_names = [n for n, _ in model.named_modules() if n]
    for pattern in spec.include + spec.exclude + spec.keep_fp:
        if not any(_matches(n, [pattern]) for n in all_names):
            sample = ", ".join(all_names[:8])
            raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}; "
                             f"module names look like: {sample}, ...")

    leaves = [(n, m) for n, m in model.named_modules() if n and (isinstance(m, BinaryMixin) or (
        not list(m.children()) and any(True for _ in m.parameters(recurse=False))))]
    kept = default_kept(model, leaves)

    # An explicit include pattern (no wildcard) that names a layer of a type we cannot binarize is an error.
    for pattern in spec.include:
        if any(c in pattern for c in "*?["):
            continue
        hit = [(n, m) for n, m in leaves if _matches(n, [pattern])]
        if hit and not any(type(m) in BINARY_TYPES or isinstance(m, BinaryMixin) for _, m in hit):
            n, m = hit[0]
            raise ValueError(f"cannot binarize {n} ({type(m).__name__}): surgery binarizes "
                             f"{', '.join(t.__name__ for t in BINARY_TYPES)} layers only")

    attention = _attention_blocks(model) if spec.extra_layernorm else []
    if spec.extra_layernorm and not attention:
        raise ValueError(f"extra_layernorm=True but {type(model).__name__} has no attention block with a "
                         "'proj' Linear (ViT / DeiT / Swin style); set extra_layernorm=False")

    rows, swaps = [], []
    for name, m in leaves:
        params = sum(p.numel() for p in m.parameters(recurse=False))
        kind = type(m).__name__
        if isinstance(m, BinaryMixin):
            rows.append(ReportRow(name, kind, "kept (already binarized)", params))
        elif type(m) not in BINARY_TYPES:
            continue  # norms, embeddings, tokens: full precision by design, not listed
        elif not _matches(name, spec.include):
            rows.append(ReportRow(name, kind, "kept (not included)", params))
        elif _matches(name, spec.exclude):
            rows.append(ReportRow(name, kind, "kept (excluded)", params))
        elif _matches(name, spec.keep_fp):
            rows.append(ReportRow(name, kind, "kept (keep_fp)", params))
        elif (spec.keep_first and kept.get(name) == "first layer") or (spec.keep_head and kept.get(name) == "head"):
            rows.append(ReportRow(name, kind, f"kept ({kept[name]})", params))
        else:
            swaps.append((name, m))
            rows.append(ReportRow(name, kind, "binarized", params))
    if not swaps and not any(r.action == "kept (already binarized)" for r in rows):
        raise ValueError(f"nothing to binarize in {type(model).__name__} with include={spec.include} "
                         f"exclude={spec.exclude} keep_fp={spec.keep_fp}: no Conv2d / Linear layer left after the "
                         "rules")
    placement = _placement.resolve(model, spec.activation_placement) if spec.activation is not None else None
    # Build every layer before touching the model: a spec that cannot fit a layer is refused here, by name.
    built = []
    for name, m in swaps:
        try:
            built.append((name, BINARY_TYPES[type(m)].from_float(m, **spec.layer_kwargs(placement or "none"))))
        except ValueError as e:
            raise ValueError(f"cannot binarize {name} ({type(m).__name__}): {e}") from None
    # Everything is validated: only now is the model changed.
    for name, new in built:
        _set_module(model, name, new)
    layout = _placement.apply_(model, placement, [n for n, _ in built]) if placement else {}
    for _, attn in attention:
        add_attention_norm(attn)
    added = [n for n, _ in attention]
    model.pcpp_extra_norms = getattr(model, "pcpp_extra_norms", []) + added
    # The specs applied so far, in order: an export manifest rebuilds the model through binarize_ from them.
    model.pcpp_binarize = getattr(model, "pcpp_binarize", []) + [spec.to_dict()]
    report = SurgeryReport(rows, added, spec, layout, placement)
    if calibration is not None and spec.activation is not None:
        report.balance = prepare_activations_(model, calibration, strict=spec.activation_guard == "error")
        if report.balance.refused:  # activation_guard="warn": go on, but say so
            warnings.warn(report.balance.error(warn=True), RuntimeWarning, stacklevel=2)
    elif spec.activation is not None and any(b.act_threshold is not None for _, b in built):
        warnings.warn(UncalibratedThresholdsWarning(
            f"{sum(b.act_threshold is not None for _, b in built)} binarized activations binarize x - beta with "
            "beta = 0 (activation_placement 'threshold', uncalibrated) and the guard did not run: after a ReLU "
            "they are one-sided, their sign constant. Pass calibration=[batch, ...] (a few input batches, "
            "normalised as the model expects) to calibrate them and run the guard, or load trained thresholds "
            "(pcpp.models.load with weights)"), stacklevel=2)
    return report
