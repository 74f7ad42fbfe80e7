"""Sensitivity-guided mixed binarization: which blocks stay in full precision, and what the export costs.

A sensitivity scan (pcpp.sensitivity.scan) gives each block's accuracy drop when that block alone is
binarized. A keep_fp policy of the binarize spec (pcpp.surgery.check_keep_fp) turns it into patterns:

- `{from_sensitivity: K}`: the K most sensitive blocks;
- `{budget_bytes: N}`: the largest K whose K most sensitive blocks, kept, give an export of at most N bytes;
- `{budget_ratio: R}`: the largest K whose export is still at least R times smaller than fp32
  (`ratio_to_fp32`, what pcpp.export's size summary and the export stage report, >= R).

Ranking: the largest drop first (`by`: drop_bat when the scan has it, else drop_ptb; drops compared to 1e-9,
so that two accuracies of the same count tie); ties go to the block with fewer binarized parameters (the
cheaper one to keep), then to the scan's order. The kept set is always a prefix of that ranking, so budgets
and K values lie on the same frontier; a smaller block further down is not slipped in.

Sizes are predicted, not measured: `predict_file_bytes` is the exact size of the file pcpp.export.save
writes (the packed data of pcpp.export.size_summary plus the safetensors header), computed on a model that
may live on the meta device. Pure torch.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pcpp.calibration import UncalibratedThresholdsWarning
from pcpp.export import FORMAT, check_precision, kept_dtype, size_summary
from pcpp.layers import binary_layers
from pcpp.surgery import RANKINGS, BinarizeSpec, binarize_, check_keep_fp, is_keep_fp_policy, matches

__all__ = ["KeepDecision", "Pricer", "predict_file_bytes", "rank", "resolve"]

TIE_DIGITS = 9  # drops equal to 1e-9 are ties (accuracies are counts / n: their differences round apart)
# safetensors' dtype names, for the header's text
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


# -- sizes ------------------------------------------------------------------------------------------------
def predict_file_bytes(model: nn.Module, precision: str = "fp32") -> int:
    """Bytes of the file `pcpp.export.save(model, path, precision=precision)` writes: the 8-byte length, the
    safetensors JSON header (its tensors ordered as safetensors orders them, padded to 8 bytes) and the data
    (`size_summary(model, precision).ideal_bytes`). Works on a meta-device model. ValueError for an unknown
    precision or a model without a binarized layer (save refuses it too)."""
    scale_dtype = check_precision(precision)
    binary = dict(binary_layers(model))
    if not binary:
        raise ValueError(f"{type(model).__name__} has no binarized layer: nothing to export")
    numel = {"binary.bits": [torch.uint8, 0], "binary.scales": [scale_dtype, 0]}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0] or key
        layer = binary.get(owner)
        if layer is not None and key == f"{owner}.weight":  # as pcpp.export.save lays a binarized weight out
            numel["binary.bits"][1] += math.ceil(t.numel() / 8)
            numel["binary.scales"][1] += t.shape[0] if layer.scaling == "channel" else 1
        else:
            dtype = kept_dtype(t, precision)
            group = numel.setdefault(f"flat.{str(dtype).replace('torch.', '')}", [dtype, 0])
            group[1] += t.numel()
    data = size_summary(model, precision).ideal_bytes
    # safetensors writes the tensors by decreasing alignment (item size), then by name
    order = sorted(numel, key=lambda k: (-numel[k][0].itemsize, k))
    header, offset = {"__metadata__": {"format": FORMAT}}, 0
    for name in order:
        dtype, n = numel[name]
        end = offset + n * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES.get(dtype, "F32"), "shape": [n], "data_offsets": [offset, end]}
        offset = end
    text = len(json.dumps(header, separators=(",", ":")))
    return 8 + text + (-text) % 8 + data


# -- ranking ----------------------------------------------------------------------------------------------
def _column(rows: list[dict], by: str | None) -> str:
    if by is not None and by not in RANKINGS:
        raise ValueError(f"unknown ranking column {by!r}; valid: {', '.join(RANKINGS)}")
    has = [c for c in RANKINGS if all(c in r and r[c] not in (None, "") for r in rows)]
    column = by or ("drop_bat" if "drop_bat" in has else "drop_ptb")
    if column not in has:
        raise ValueError(f"the sensitivity rows have no {column!r} column (they have: {', '.join(rows[0])}); "
                         f"rank by one of: {', '.join(has) or 'none (not a sensitivity scan)'}")
    return column


def rank(rows: list[dict], by: str | None = None) -> tuple[str, list[str]]:
    """(the column ranked by, the blocks from most to least sensitive) of sensitivity-scan rows (dicts with
    `block`, `params_binarized` and drop_ptb / drop_bat, numbers or their text as a CSV holds them).

    Order: the largest drop first (to TIE_DIGITS decimals), then fewer binarized parameters, then the rows'
    order. ValueError for no rows, a missing column, or a block named twice."""
    if not rows:
        raise ValueError("no sensitivity rows to rank: the scan has no blocks")
    missing = [c for c in ("block", "params_binarized") if c not in rows[0]]
    if missing:
        raise ValueError(f"the sensitivity rows lack {missing} (they have: {', '.join(rows[0])})")
    column = _column(rows, by)
    names = [str(r["block"]) for r in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the sensitivity rows name blocks more than once: {twice}")
    order = sorted(range(len(rows)), key=lambda i: (-round(float(rows[i][column]), TIE_DIGITS),
                                                   int(float(rows[i]["params_binarized"])), i))
    return column, [names[i] for i in order]


# -- pricing and resolution -------------------------------------------------------------------------------
@dataclass
class KeepDecision:
    """What a keep_fp policy chose, and what it costs.

    `blocks`: the kept blocks, most sensitive first (a prefix of `ranking`); `sizes[k]`: predicted file bytes
    with the first k blocks of the ranking kept (None where not priced); `fp32_bytes[k]`: the fp32 size those
    models are compared with (pcpp.export.SizeSummary.fp32_bytes); `budget_bytes`: the byte budget the
    policy set (budget_ratio: fp32_bytes / R), None for from_sensitivity."""

    policy: dict
    by: str
    ranking: list[str]
    blocks: list[str]
    precision: str
    sizes: list[int | None] = field(default_factory=list)
    fp32_bytes: list[int | None] = field(default_factory=list)
    budget_bytes: float | None = None

    @property
    def predicted_bytes(self) -> int:
        """Predicted bytes of the exported file with `blocks` kept."""
        return self.sizes[len(self.blocks)]

    @property
    def predicted_ratio(self) -> float:
        """fp32 bytes / predicted file bytes (the export's ratio_to_fp32)."""
        return self.fp32_bytes[len(self.blocks)] / self.predicted_bytes

    def describe(self) -> str:
        """One line for a console: what is kept and what the export is predicted to cost."""
        return (f"keeps {', '.join(self.blocks) or 'no block'} in full precision (export {self.predicted_bytes:,} "
                f"bytes predicted, {self.predicted_ratio:.1f}x smaller than fp32)")

    def to_dict(self) -> dict:
        """The decision as JSON-ready data (keep_fp.json): `sizes` / `fp32_bytes` map each priced k (as a
        string, JSON's keys) to its bytes; the k never priced are left out."""
        def priced(values: list) -> dict[str, int]:
            return {str(k): v for k, v in enumerate(values) if v is not None}

        return {**asdict(self), "sizes": priced(self.sizes), "fp32_bytes": priced(self.fp32_bytes),
                "predicted_bytes": self.predicted_bytes, "predicted_ratio": self.predicted_ratio}


class Pricer:
    """Predicted export sizes of `model` (full precision, e.g. on the meta device) binarized by `spec` with
    the first k blocks of `ranking` kept in full precision; each k is priced once."""

    def __init__(self, model: nn.Module, spec: BinarizeSpec, ranking: list[str], precision: str = "fp32"):
        check_precision(precision)
        if not isinstance(spec.keep_fp, list):
            raise ValueError(f"the spec to price has a keep_fp policy {spec.keep_fp}: give it patterns")
        self.model, self.spec, self.ranking, self.precision = model, spec, ranking, precision
        self._sizes: dict[int, tuple[int | None, int | None]] = {}
        self._binarized: list[str] | None = None  # the layers the spec binarizes with nothing kept

    def leaves_binarized(self, k: int) -> bool:
        """Whether some layer is still binarized with the first k blocks kept (else it is the fp model)."""
        if self._binarized is None:
            self._binarized = self._binarize(self.spec).binarized
        kept = [*self.spec.keep_fp, *self.ranking[:k]]
        return any(not matches(name, kept) for name in self._binarized)

    def spec_with(self, k: int) -> BinarizeSpec:
        """The spec with the k most sensitive blocks added to its keep_fp patterns."""
        return BinarizeSpec.from_dict({**asdict(self.spec), "keep_fp": [*self.spec.keep_fp, *self.ranking[:k]]})

    def __call__(self, k: int) -> tuple[int | None, int | None]:
        """(predicted file bytes, fp32 bytes) with the first k blocks kept; (None, None) when that leaves no
        layer binarized (the full-precision model: binarize_ and pcpp.export refuse it)."""
        if k not in self._sizes and not self.leaves_binarized(k):
            self._sizes[k] = (None, None)
        if k not in self._sizes:
            model = copy.deepcopy(self.model)
            self._binarize(self.spec_with(k), model)
            self._sizes[k] = predict_file_bytes(model, self.precision), size_summary(model, self.precision).fp32_bytes
        return self._sizes[k]

    def _binarize(self, spec: BinarizeSpec, model: nn.Module | None = None):
        with warnings.catch_warnings():  # shapes only: thresholds are calibrated where the model is trained
            warnings.simplefilter("ignore", UncalibratedThresholdsWarning)
            return binarize_(copy.deepcopy(self.model) if model is None else model, spec)

    def decision(self, policy: dict, by: str, k: int, budget: float | None = None) -> KeepDecision:
        """The decision to keep the first k blocks (priced), with every size priced so far."""
        self(k)
        known = [self._sizes.get(i, (None, None)) for i in range(len(self.ranking) + 1)]
        return KeepDecision(policy, by, list(self.ranking), self.ranking[:k], self.precision,
                            [s for s, _ in known], [f for _, f in known], budget)


def resolve(policy: dict | list, rows: list[dict], model: nn.Module, spec: BinarizeSpec | dict,
            precision: str | None = None) -> KeepDecision:
    """The blocks a keep_fp policy keeps, given sensitivity-scan rows (see `rank`) and the full-precision
    `model` (a meta-device one will do: only shapes are read) that `spec` binarizes. Patterns in
    spec.keep_fp stay kept besides the policy's blocks (priced with them; `blocks` lists the policy's only).

    `precision`: the export precision sizes are priced at (the policy's own `precision` wins; default fp32).
    A list policy keeps exactly those patterns (no ranking). Raises ValueError for an invalid policy,
    from_sensitivity larger than the number of blocks (naming both), or a budget that not even the export
    with no block kept meets (naming that export's size: the smallest budget this spec can meet). A budget
    that fits everything keeps every block."""
    policy = check_keep_fp(policy)
    spec = BinarizeSpec.from_dict(spec) if isinstance(spec, dict) else spec
    # patterns in the spec stay kept, the policy's blocks come on top; the spec's own policy is the one resolved
    base = spec if not is_keep_fp_policy(spec.keep_fp) else BinarizeSpec.from_dict({**asdict(spec), "keep_fp": []})
    if not is_keep_fp_policy(policy):  # patterns: kept as given, priced as they are
        base = BinarizeSpec.from_dict({**asdict(spec), "keep_fp": []})
        pricer = Pricer(model, base, policy, precision or "fp32")
        if not pricer.leaves_binarized(len(policy)):
            raise ValueError(f"keep_fp {policy} keeps every binarizable layer in full precision: nothing to binarize")
        return pricer.decision({"patterns": policy}, "", len(policy))
    precision = policy.get("precision", precision or "fp32")
    by, ranking = rank(rows, policy.get("by"))
    pricer = Pricer(model, base, ranking, precision)
    n = len(ranking)
    most = max(k for k in range(n + 1) if pricer.leaves_binarized(k))  # n unless that is the fp model
    if "from_sensitivity" in policy:
        k = policy["from_sensitivity"]
        if k > most:
            why = (f"more than the {n} blocks of the sensitivity scan ({', '.join(ranking)})" if k > n else
                   f"every block of the sensitivity scan ({', '.join(ranking)}): no layer would be binarized")
            every = f"; {most + 1} would leave no layer binarized" if most < n and k > n else ""
            raise ValueError(f"keep_fp from_sensitivity {k} is {why}; valid: 0 to {most}{every}")
        chosen, budget = k, None
    else:
        prices = [pricer(i) for i in range(most + 1)]
        if "budget_bytes" in policy:
            budget = float(policy["budget_bytes"])
            fits = [i for i, (size, _) in enumerate(prices) if size <= budget]
        else:
            ratio = float(policy["budget_ratio"])
            budget = prices[0][1] / ratio
            fits = [i for i, (size, fp32) in enumerate(prices) if fp32 / size >= ratio]
        if not fits:
            key = next(k for k in policy if k.startswith("budget_"))
            size, fp32 = min(prices)
            raise ValueError(f"keep_fp {key} {policy[key]} cannot be met: the smallest export of this spec is "
                             f"{size} bytes at {precision} ({fp32 / size:.2f}x smaller than fp32, with no block "
                             f"kept): give a budget_bytes of at least {size} or a budget_ratio of at most "
                             f"{fp32 / size:.2f}")
        chosen = max(fits)
    return pricer.decision(policy, by, chosen, budget)
