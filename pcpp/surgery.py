"""Model surgery: `binarize_(model, spec)`, the one way to binarize a model (torchao's quantize_ pattern).

Modules are chosen by name patterns (fnmatch; a pattern also covers the children of a matched module,
so "layer2" or "blocks.3.attn" selects a whole block). nn.Conv2d and nn.Linear leaves are swapped
for BinaryConv2d / BinaryLinear in place, keeping parameter names. By default the first layer (conv /
patch embedding) and the classifier head stay in full precision. For ViT / DeiT / Swin the spec can add
one LayerNorm at the end of each attention block (the paper's section 4.3, protocol 2).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from pcpp.nn import ACCUMULATOR_BITS, BINARY_TYPES, SCALINGS, UNITS, BinaryMixin, make_quantizer


@dataclass
class BinarizeSpec:
    """What to binarize and how. Round-trips through `to_dict` / `from_dict` (unknown keys refused)."""

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

    def __post_init__(self):
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
        make_quantizer(self.weight)  # validates names and parameters now, before any surgery
        make_quantizer(self.activation)

    @property
    def task(self) -> str:
        """The paper's task name: BW, BWA or BWAA."""
        if self.activation is None:
            return "BW"
        return "BWAA" if self.accumulator_bits else "BWA"

    def layer_kwargs(self) -> dict:
        return dict(weight_quantizer=self.weight, act_quantizer=self.activation, scaling=self.scaling,
                    units=self.units, accumulator_bits=self.accumulator_bits)

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
        lines = [f"binarization ({self.spec.task}, weight={_qname(self.spec.weight)}, "
                 f"activation={_qname(self.spec.activation)}, scaling={self.spec.scaling})",
                 f"{'module':<{w}}  {'type':<8}  {'params':>10}  action", "-" * (w + 40)]
        lines += [f"{r.name:<{w}}  {r.kind:<8}  {r.params:>10,}  {r.action}" for r in self.rows]
        total = sum(r.params for r in self.rows)
        lines.append(f"{len(self.binarized)} of {len(self.rows)} layers binarized: {self.binary_params:,} of "
                     f"{total:,} layer parameters")
        if self.added_norms:
            lines.append(f"extra LayerNorm after {len(self.added_norms)} attention blocks")
        return "\n".join(lines)


def _qname(spec) -> str:
    return "none" if spec is None else spec if isinstance(spec, str) else spec.get("name", "?")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def first_and_head(model: nn.Module, leaves: list[tuple[str, nn.Module]]) -> tuple[str | None, str | None]:
    """timm records its first conv and classifier in pretrained_cfg; otherwise first and last leaf."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = [n for n, _ in leaves]
    first = cfg.get("first_conv")
    head = cfg.get("classifier")
    first = first if first in names else (names[0] if names else None)
    head = head if head in names else (names[-1] if names else None)
    return first, head


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


def binarize_(model: nn.Module, spec: BinarizeSpec | dict | None = None) -> SurgeryReport:
    """Binarize `model` in place following `spec`; returns the report of what changed."""
    if spec is None:
        spec = BinarizeSpec()
    elif isinstance(spec, dict):
        spec = BinarizeSpec.from_dict(spec)

    all_names = [n for n, _ in model.named_modules() if n]
    for pattern in spec.include + spec.exclude:
        if not any(_matches(n, [pattern]) for n in all_names):
            sample = ", ".join(all_names[:8])
            raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}; "
                             f"module names look like: {sample}, ...")

    leaves = [(n, m) for n, m in model.named_modules() if n and (isinstance(m, BinaryMixin) or (
        not list(m.children()) and any(True for _ in m.parameters(recurse=False))))]
    first, head = first_and_head(model, leaves)

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
        elif spec.keep_first and name == first:
            rows.append(ReportRow(name, kind, "kept (first layer)", params))
        elif spec.keep_head and name == head:
            rows.append(ReportRow(name, kind, "kept (head)", params))
        else:
            swaps.append((name, m))
            rows.append(ReportRow(name, kind, "binarized", params))
    if not swaps and not any(r.action == "kept (already binarized)" for r in rows):
        raise ValueError(f"nothing to binarize in {type(model).__name__} with include={spec.include} "
                         f"exclude={spec.exclude}: no Conv2d / Linear layer left after the rules")
    # Everything is validated: only now is the model changed.
    for name, m in swaps:
        _set_module(model, name, BINARY_TYPES[type(m)].from_float(m, **spec.layer_kwargs()))
    for _, attn in attention:
        add_attention_norm(attn)
    added = [n for n, _ in attention]
    model.pcpp_extra_norms = getattr(model, "pcpp_extra_norms", []) + added
    return SurgeryReport(rows, added, spec)
