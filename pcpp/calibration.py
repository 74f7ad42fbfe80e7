"""Activation thresholds from data, and the guard against binarized activations that carry nothing.

docs/contracts.md, "Binarized layers and surgery": in a ReLU network every input of a binarized
conv is >= 0, so an honest sign() is +1 everywhere (ResNet-20 with the teacher's weights and sign
activations: 10.0%, chance). Two tools, both pure torch and run before training starts:

- `calibrate_thresholds_(model, batches)`: each binarized layer's `act_threshold` (beta, one entry per
  input channel) is set to the per-channel median of its input over a few batches, in eval mode under
  the honest binarized forward. Fine-tuning from a teacher calibrates; end-to-end training may start at
  beta = 0, which in a ReLU network leaves every binarized conv constant (the guard refuses it), so a
  random-init ReLU model is calibrated too (a data-dependent init) or uses a layout placement.
- `check_activation_balance(model, batch)`: the share of each binarized activation's inputs that the
  honest forward sends to -1; a layer at or past `limit` on one side is refused by name.

And one run after training (each epoch, before the honest evaluation):

- `recalibrate_batchnorm_(model, batches)`: every BatchNorm's running statistics re-estimated under the
  honest binarized forward. Training leaves them as the training forward saw them (SS at finite mu, a
  soft activation); the binary network's conv outputs have other statistics, and its honest accuracy
  pays for the mismatch (ResNet-20 BWA, 1 FT epoch: 27.1% -> 36.8%; docs/activations.md).

The training worker calls both after `binarize_` (and after any checkpoint load) and before the
optimizer / DeepSpeed wrap the model; `prepare_activations_` does the two in that order.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pcpp.evaluation import as_input, model_device, model_dtype
from pcpp.layers import BinaryMixin, binary_layers, evaluation

_MAX_PER_CHANNEL = 1 << 14  # values kept per channel and batch (a fixed, evenly spaced subsample)


def _inputs(batch) -> torch.Tensor:
    """The model input of a batch: a tensor, or the first item of an (x, y, ...) tuple / list."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"a calibration batch is a tensor or an (inputs, labels) pair, got {type(x).__name__}")
    return x


def channel_rows(layer: BinaryMixin, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (C, values): channels at dim -3 for a conv, the last dim for a Linear."""
    dim = x.dim() - 3 if isinstance(layer, nn.Conv2d) else x.dim() - 1
    return x.detach().movedim(dim, 0).reshape(layer.input_channels, -1)


def balanced_median(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the threshold t that splits the values most evenly under sign(x - t) (sign(0) = +1).

    Without ties this is the median (the value at rank n // 2: n // 2 values lie below it). When many
    values equal the median (the zeros after a ReLU), t = median would put them all on the + side; t then
    moves to the midpoint between the median and the next larger value whenever that split is closer to
    one half. Computed in float32 (float64 input stays float64); returns shape (C,).
    """
    v = rows.float() if rows.dtype != torch.float64 else rows
    n = v.shape[1]
    med = v.kthvalue(n // 2 + 1, dim=1, keepdim=True).values  # rank n // 2 (0-based), no full sort
    below = (v < med).sum(dim=1, keepdim=True)
    upto = (v <= med).sum(dim=1, keepdim=True)
    nxt = torch.where(v > med, v, torch.full_like(v, float("inf"))).amin(dim=1, keepdim=True)
    use_above = (upto < n) & ((upto - n / 2).abs() < (below - n / 2).abs())
    return torch.where(use_above, 0.5 * (med + nxt), med).reshape(-1)


def _subsample(rows: torch.Tensor, limit: int) -> torch.Tensor:
    n = rows.shape[1]
    if n <= limit:
        return rows
    idx = torch.linspace(0, n - 1, limit, device=rows.device).round().long()
    return rows[:, idx]


def thresholded_layers(model: nn.Module) -> list[tuple[str, BinaryMixin]]:
    """The binarized layers that own an activation threshold."""
    return [(n, m) for n, m in binary_layers(model) if m.act_threshold is not None]


@torch.no_grad()
def calibrate_thresholds_(model: nn.Module, batches: Iterable, *, honest: bool = True,
                          max_per_channel: int = _MAX_PER_CHANNEL) -> dict[str, torch.Tensor]:
    """Set every `act_threshold` to the per-channel (balanced) median of the layer's input.

    batches: an iterable of input tensors (N, C, H, W) or (inputs, labels) pairs, already normalised as
    the model expects; moved to the model's device. A few training batches (e.g. 4 x 128 CIFAR images)
    suffice. Runs in eval mode, without gradients, under the honest binarized forward (honest=False: the
    training forward); each time a layer runs its threshold is set from that batch, so the layers after
    it see calibrated inputs, and at the end from all its inputs (up to `max_per_channel` values per
    channel and batch, evenly spaced).
    Training flags and honest flags are restored on exit. Returns {layer name: threshold (C,)}; {} when
    no layer has a threshold (BW, or placements without one). Raises ValueError for an empty iterable
    or a batch that is not a tensor. Paper section 4 (BWA / BWAA), ReActNet's RSign initialised from data.
    """
    layers = thresholded_layers(model)
    if not layers:
        return {}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    handles = []

    def hook(name):
        def pre(layer, args):
            seen[name].append(_subsample(channel_rows(layer, args[0]), max_per_channel))
            # this batch's median now, so that the layers after it see a calibrated input; the median
            # of all batches at the end
            layer.act_threshold.copy_(balanced_median(seen[name][-1]).to(layer.act_threshold.dtype))
        return pre

    device, n_batches = model_device(model), 0
    try:
        for name, layer in layers:
            handles.append(layer.register_forward_pre_hook(hook(name)))
        with evaluation(model, honest):
            for batch in batches:
                model(_inputs(batch).to(device))
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if not n_batches:
        raise ValueError("calibrate_thresholds_ got no batch: give a few training batches")
    for name, layer in layers:
        if len(seen[name]) > 1:
            layer.act_threshold.copy_(balanced_median(torch.cat(seen[name], dim=1)).to(layer.act_threshold.dtype))
    return {n: m.act_threshold.detach().clone() for n, m in layers}


class UncalibratedThresholdsWarning(RuntimeWarning):
    """binarize_ made BWA / BWAA layers with learnable thresholds (beta = 0) and was given no calibration
    batches: after a ReLU each such layer is one-sided until its thresholds are calibrated or loaded."""


@contextlib.contextmanager
def thresholds_set_next():
    """Silence UncalibratedThresholdsWarning around a binarize_ whose caller sets the thresholds right after
    (loads a checkpoint, or calibrates them: pcpp.models.load with weights, the training worker)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncalibratedThresholdsWarning)
        yield


@dataclass
class BalanceRow:
    name: str
    below: float  # share of the inputs the honest forward sends to -1 (below the threshold)
    one_sided_channels: float  # share of input channels whose inputs all fall on one side
    threshold: str  # "learned" (act_threshold), or the placement that makes the input signed

    @property
    def worst_side(self) -> float:
        return max(self.below, 1.0 - self.below)


@dataclass
class BalanceReport:
    """Per binarized activation: the share of its inputs below its threshold, on one batch."""

    rows: list[BalanceRow]
    limit: float

    @property
    def refused(self) -> list[BalanceRow]:
        return [r for r in self.rows if r.worst_side >= self.limit]

    def to_dict(self) -> dict[str, float]:
        """{layer: share below}, for MLflow params / metrics."""
        return {r.name: r.below for r in self.rows}

    def __str__(self) -> str:
        """The table: one row per binarized activation, in forward order, with a legend of its columns."""
        w = max([len(r.name) for r in self.rows] + [5])
        lines = [f"# below: share of the layer's inputs the honest forward sends to -1 (0.5 = balanced); "
                 f"one-sided ch.: share of its input channels whose inputs all fall on one side; threshold: "
                 f"'learned' (a calibrated beta) or the placement that signs the input; '<- one-sided': "
                 f">= {self.limit:.0%} on one side, its sign carries no information",
                 f"{'layer':<{w}}  {'below':>7}  {'one-sided ch.':>13}  threshold", "-" * (w + 42)]
        for r in self.rows:
            flag = "  <- one-sided" if r.worst_side >= self.limit else ""
            lines.append(f"{r.name:<{w}}  {r.below:>7.3f}  {r.one_sided_channels:>13.3f}  {r.threshold}{flag}")
        return "\n".join(lines)

    def error(self, shown: int = 6, *, warn: bool = False) -> str:
        """What is wrong and what to set; names the first `shown` one-sided layers (the table has them all).
        warn=True: the run goes on (activation_guard warn), and the message says so."""
        named = [f"{r.name} ({r.below:.1%} below)" for r in self.refused]
        more = len(named) - shown
        bad = ", ".join(named[:shown]) + (f" and {more} more (the guard's table lists all)" if more > 0 else "")
        if all(r.threshold == "learned" for r in self.refused):  # threshold placement: beta not where the data is
            fix = ("their thresholds sit outside the inputs: calibrate them (pcpp train and binarize_(..., "
                   "calibration=batches) do, at the per-channel median; pcpp.calibration.calibrate_thresholds_), "
                   "or set binarize.activation_placement to 'pre_relu' / 'hardtanh' for a CNN that defines them "
                   "(resnet20)")
        else:
            fix = ("set binarize.activation_placement to 'auto' or 'threshold' (calibrated thresholds), or to "
                   "'pre_relu' / 'hardtanh' for a CNN that defines them (resnet20)")
        return (f"{len(self.refused)} of {len(self.rows)} binarized activations put >= {self.limit:.0%} of their "
                f"inputs on one side of the threshold, so their honest sign is (almost) constant and carries no "
                f"information: {bad}. To fix: {fix}" + ("; running anyway (activation_guard=warn)" if warn else
                                                        "; binarize.activation_guard=warn runs anyway"))


@torch.no_grad()
def check_activation_balance(model: nn.Module, batch, limit: float = 0.99, *, strict: bool = True) -> BalanceReport:
    """Measure, on one batch, each binarized activation's share of inputs below its threshold.

    "Below" means sent to -1 by the honest binarized forward (sign(x - beta) with sign(0) = +1), measured
    under `binary_eval` (eval mode; flags restored on exit). batch: an input tensor or an (inputs, labels)
    pair, normalised as the model expects. limit in (0.5, 1]: a layer with a share >= limit on either
    side is refused. Returns the per-layer BalanceReport (rows in forward order; empty for BW); with
    strict=True raises ValueError naming every refused layer and what to set, with strict=False the
    caller decides (e.g. logs a warning). docs/contracts.md, "Binarized layers and surgery".
    """
    if not 0.5 < limit <= 1.0:
        raise ValueError(f"limit must lie in (0.5, 1], got {limit!r}")
    rows: list[BalanceRow] = []
    handles = []

    def pre(layer, args, name):
        binary = layer.act_quantizer.binarize(layer.shift_input(args[0]))
        neg = channel_rows(layer, binary) < 0
        share = neg.float().mean(dim=1)
        kind = "learned" if layer.act_threshold is not None else layer.activation_placement
        rows.append(BalanceRow(name, float(neg.float().mean()), float(((share == 0) | (share == 1)).float().mean()),
                               kind))

    try:
        for name, layer in binary_layers(model):
            if layer.act_quantizer is not None:
                handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
        with evaluation(model, honest=True):
            model(_inputs(batch).to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    report = BalanceReport(rows, limit)
    if strict and report.refused:
        raise ValueError(report.error())
    return report


def prepare_activations_(model: nn.Module, batches: list, *, calibrate: bool = True, limit: float = 0.99,
                         strict: bool = True) -> BalanceReport:
    """Calibrate the thresholds on `batches` (when `calibrate`), then check the balance on the first one.

    The one call the training worker makes for BWA / BWAA, after binarize_ and checkpoint loads and
    before the optimizer is built: calibrate=True when fine-tuning from a teacher without a binarized
    init checkpoint, False for end-to-end training or a student that already has trained thresholds.
    Returns the BalanceReport; raises ValueError as `check_activation_balance` does (strict=True).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("prepare_activations_ needs at least one batch")
    if calibrate:
        calibrate_thresholds_(model, batches)
    return check_activation_balance(model, batches[0], limit, strict=strict)


def _restore(saved: dict) -> None:
    """Put back the running statistics of `saved` ({BatchNorm: (momentum, mean, var, count)})."""
    for m, (_, mean, var, count) in saved.items():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, batches: Iterable, *, device: torch.device | str | None = None,
                           reduce=None) -> int:
    """Re-estimate every BatchNorm's running mean and variance under the honest binarized forward.

    Each BatchNorm (tracking running statistics) is reset and then averages, with equal weight, the batch
    statistics it sees while `batches` ((N, ...) inputs or (inputs, labels) pairs, e.g. a few training
    batches) run through the model in eval mode, the binarized layers honest (sign activations and
    weights), the BatchNorms alone in train mode: the mean of the batch means and the mean of the batch
    (unbiased) variances, PyTorch's cumulative average and fvcore's precise BN, i.e. the average of what a
    train-mode BatchNorm normalises each batch with. Affine weights, parameters, every module's flags
    (training, honest, momentum) and BWAA's overflow counters (pcpp.layers.evaluation) are as before on
    return. `reduce`, when given, is called on each running_mean / running_var tensor after the pass and
    must average it in place over the workers (torch.distributed all_reduce / world size): every rank then
    keeps the same statistics, and with as many batches on every rank they are exactly those one process
    gets from all the ranks' batches (both are means over batches; averaging second moments instead would
    add the spread between the ranks' means but not between batches, so two ranks would disagree with one).
    LayerNorm and models without BatchNorm are untouched, and so is a BatchNorm the eval-mode forward
    never reaches (a training-only branch). Floating inputs are cast to the dtype of the model's
    parameters (fp16 under DeepSpeed). Returns the number of BatchNorms (0: nothing to do). Raises
    ValueError when `batches` is empty and the model has a BatchNorm.
    """
    norms = _batchnorms(model)
    if not norms:
        return 0
    device = model_device(model) if device is None else torch.device(device)
    dtype = model_dtype(model)
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms}
    seen = 0
    try:
        with evaluation(model, honest=True):
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: every batch counts the same
                m.train()
            for batch in batches:
                x = _inputs(batch).to(device)
                model(as_input(x, dtype))
                seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm_ needs at least one batch")
        # a BatchNorm off the eval-mode path (a training-only head) keeps its statistics
        _restore({m: state for m, state in saved.items() if int(m.num_batches_tracked) == 0})
        if reduce is not None:  # every BatchNorm, reached or not: each rank makes the same calls
            for m in norms:
                reduce(m.running_mean)
                reduce(m.running_var)
    except BaseException:
        _restore(saved)  # nothing half-estimated stays behind
        raise
    finally:
        for m, (momentum, *_) in saved.items():
            m.momentum = momentum
    return len(norms)
