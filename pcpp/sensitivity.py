"""Sensitivity scan: which block should one binarize (the paper's section 4.3, Figure 3). Pure torch.

For each block of a full-precision model, a fresh copy gets only that block binarized (`binarize_` with
`include=[block]`) and the honest binarized network is evaluated (pcpp.evaluation): post-training
binarization (PTB) of that block alone. Optionally a short binarization-aware training (BAT) follows
before a second evaluation. The drop from the full-precision accuracy, per block, is what Figure 3
colours; the block names are exactly the include patterns `binarize_` takes, so a scan's output feeds
straight back into a binarization spec. Accuracies are fractions in [0, 1]; `drop_*` = acc_fp - acc_*.

The pipeline stage (stages.sensitivity) adds the config, the data, the files and the figure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from pcpp import layers as pnn
from pcpp.calibration import calibrate_thresholds_, thresholds_set_next
from pcpp.evaluation import accuracy
from pcpp.schedules import progress_at
from pcpp.surgery import BinarizeSpec, binarize_, first_and_head

TRANSFORMER_PARTS = ("attn", "mlp")  # one Figure 3 row each

__all__ = ["TRANSFORMER_PARTS", "bat", "blocks", "scan", "worst"]


# -- blocks -------------------------------------------------------------------------------------------------
def _binarizable(m: nn.Module) -> bool:
    return type(m) in pnn.BINARY_TYPES


def _layer_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if _binarizable(m)]


def _transformer_blocks(model: nn.Module) -> list[str]:
    """`<block>.attn` and `<block>.mlp` of every transformer block (ViT / DeiT / Swin / ...)."""
    return [f"{name}.{part}" for name, m in model.named_modules()
            if name and all(isinstance(getattr(m, p, None), nn.Module) for p in TRANSFORMER_PARTS)
            for part in TRANSFORMER_PARTS]


def _container_blocks(module: nn.Module, prefix: str = "") -> list[str]:
    """Children of the outermost Sequential / ModuleList containers that hold Conv2d / Linear layers.

    ResNets give `layer1.0` ... (timm and CIFAR alike), VGG-like models `features.3`, `classifier.0`.
    """
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        holders = [(n, c) for n, c in module.named_children() if any(_binarizable(m) for m in c.modules())]
        if len(holders) >= 2:
            return [f"{prefix}{n}" for n, _ in holders]
    out = []
    for n, c in module.named_children():
        out += _container_blocks(c, f"{prefix}{n}.")
    return out


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks as `binarize_` include patterns, in forward order.

    Transformers: `blocks.{i}.attn` / `blocks.{i}.mlp` (Swin: `layers.{s}.blocks.{i}.attn` / `.mlp`);
    ResNets: `layer{k}.{i}`; otherwise the children of the main sequential containers. A block must hold
    at least one Conv2d / Linear that `binarize_` would binarize: the first layer and the head never count.
    Raises ValueError when the model has no such block.
    """
    candidates = _transformer_blocks(model) or _container_blocks(model)
    leaves = [(n, m) for n, m in model.named_modules()
              if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    # the same rule binarize_ applies to keep the first layer and the head in full precision
    kept = set(first_and_head(model, leaves))
    out = []
    for name in candidates:
        layers = _layer_names(model.get_submodule(name), name)
        if any(layer not in kept for layer in layers):
            out.append(name)
    if not out:
        raise ValueError(f"found no blocks in {type(model).__name__}: no transformer attn/mlp pairs and no "
                         "sequential container of Conv2d / Linear layers; give the patterns explicitly")
    return out


# -- scan ---------------------------------------------------------------------------------------------------
def bat(model: nn.Module, loader: Iterable, steps: int, lr: float, device: torch.device) -> None:
    """A short BAT: Adam on every parameter for `steps` steps, cross-entropy, the pairs' schedules at
    progress `progress_at(step, steps)` (the last step at the schedules' end). A non-finite loss stops it
    with a warning; a loader without batches is a ValueError."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step, epoch = 0, 0
    while step < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        seen = 0
        for x, y in loader:
            if step >= steps:
                break
            pnn.set_progress(model, progress_at(step, steps))
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                warnings.warn(f"BAT stopped at step {step}: non-finite loss", stacklevel=3)
                return
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += 1
        if not seen:
            raise ValueError("the BAT loader yielded no batches")
        epoch += 1


def scan(
    model_factory: Callable[[], nn.Module],
    blocks: list[str],
    test_loader: Iterable,
    *,
    weight: str | dict = "bnn++",
    activation: str | dict | None = None,
    scaling: str = "layer",
    bat_loader: Iterable | None = None,
    bat_steps: int = 0,
    lr: float = 1e-4,
    device: str | torch.device | None = None,
    on_row: Callable[[dict], None] | None = None,
    calibration_batches: Iterable | None = None,
) -> list[dict]:
    """Binarize one block at a time of a fresh `model_factory()` and measure the accuracy drop.

    Per block: PTB, the honest binarized network with the full-precision weights; with `bat_steps` > 0
    also after that many BAT steps on `bat_loader` (every block from seed 0). Rows, in `blocks` order:
    block, layers_binarized, params_binarized, acc_fp (nothing binarized), acc_ptb, drop_ptb (and acc_bat,
    drop_bat). `on_row(row)` is called after each block (a progress display). Raises ValueError for an
    unknown quantizer or scaling, negative bat_steps, bat_steps without a bat_loader, no blocks, or a test
    loader without samples. Device: `device`, else CUDA when available, else CPU.

    With an `activation` pair, a block whose binarized layers binarize x - beta (activation_placement
    "threshold", e.g. any transformer) gets its thresholds calibrated at the per-channel median of its
    inputs (pcpp.calibration) on `calibration_batches` (a few training batches, inputs or (inputs, labels))
    before PTB, as fine-tuning does; ValueError when they are needed and not given (beta = 0 on a post-ReLU
    or post-GELU input would make the sign constant and the drop meaningless).
    """
    if bat_steps < 0:
        raise ValueError(f"bat_steps must be >= 0, got {bat_steps}")
    if bat_steps and bat_loader is None:
        raise ValueError("bat_steps > 0 needs a bat_loader (training batches)")
    if not blocks:
        raise ValueError("no blocks to scan")
    spec = BinarizeSpec(weight=weight, activation=activation, scaling=scaling)  # validates before any work
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")

    acc_fp = accuracy(model_factory().to(device), test_loader, device)
    calibration = None if calibration_batches is None else [
        b[0] if isinstance(b, (tuple, list)) else b for b in calibration_batches]
    rows = []
    for block in blocks:
        model = model_factory()
        with thresholds_set_next():  # calibrated below
            report = binarize_(model, BinarizeSpec(**{**asdict(spec), "include": [block]}))
        model.to(device)
        if any(layer.act_threshold is not None for _, layer in pnn.binary_layers(model)):
            if not calibration:
                raise ValueError(f"block {block!r} binarizes activations against thresholds (activation_placement "
                                 "'threshold'): give calibration_batches (a few training batches) to set them")
            calibrate_thresholds_(model, calibration)
        acc_ptb = accuracy(model, test_loader, device)
        row = {"block": block, "layers_binarized": len(report.binarized), "params_binarized": report.binary_params,
               "acc_fp": acc_fp, "acc_ptb": acc_ptb, "drop_ptb": acc_fp - acc_ptb}
        if bat_steps:
            torch.manual_seed(0)  # every block trains from the same seed
            bat(model, bat_loader, bat_steps, lr, device)
            row["acc_bat"] = accuracy(model, test_loader, device)
            row["drop_bat"] = acc_fp - row["acc_bat"]
        rows.append(row)
        if on_row is not None:
            on_row(row)
        del model
    return rows


def worst(rows: list[dict], key: str = "drop_ptb") -> dict:
    """The row with the largest `key` (the first of equals)."""
    return max(rows, key=lambda r: r[key])
