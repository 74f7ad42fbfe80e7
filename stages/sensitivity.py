"""Sensitivity scan: which block should one binarize (the paper's section 4.3, Figure 3).

For each block of a full-precision model, a fresh copy gets only that block binarized
(`binarize_` with `include=[block]`), and the honest binarized network is evaluated: post-training
binarization (PTB) of that block alone. Optionally a short binarization-aware training (BAT) follows
before a second evaluation. The drop from the full-precision accuracy, per block, is what Figure 3
colours; the block names are exactly the include patterns `binarize_` takes, so a scan's output feeds
straight back into a binarization spec.

Stage: inputs `teacher` (`model.pt` state dict, `recipe.json` {"name", "kwargs"}) and `data` (shard
directories `test/` and, for BAT, `train/`); writes `sensitivity.csv` and `sensitivity.png`.
Accuracies are fractions in [0, 1]; `drop_*` = acc_fp - acc_*.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pcpp import models
from pcpp import nn as pnn
from pcpp.surgery import BinarizeSpec, binarize_, first_and_head
from stages.artifact import Artifact, StageContext
from stages.config import build
from stages.engine import evaluate

CSV_NAME = "sensitivity.csv"
PNG_NAME = "sensitivity.png"
TRANSFORMER_PARTS = ("attn", "mlp")  # one Figure 3 row each

__all__ = ["SensitivityConfig", "blocks", "heatmap", "run", "scan"]


# --------------------------------------------------------------------------------------------------------
# blocks


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


# --------------------------------------------------------------------------------------------------------
# scan


def _accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    correct, total = evaluate(model, loader, device, honest=True)
    if total == 0:
        raise ValueError("the test loader yielded no samples")
    return correct / total


def _bat(model: nn.Module, loader, steps: int, lr: float, device: torch.device) -> None:
    """A short BAT: Adam on every parameter, the pairs' schedules at progress step / (steps - 1)."""
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
            pnn.set_progress(model, min(step / max(steps - 1, 1), 1.0))  # the last step at the schedules' end
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
    progress: bool = True,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Binarize one block at a time of a fresh `model_factory()` and measure the accuracy drop.

    Per block: PTB, the honest binarized network with the full-precision weights; with `bat_steps` > 0
    also after that many BAT steps on `bat_loader`. Rows: block, layers_binarized, params_binarized,
    acc_fp (nothing binarized), acc_ptb, drop_ptb (and acc_bat, drop_bat).
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

    acc_fp = _accuracy(model_factory().to(device), test_loader, device)
    rows = []
    bar = tqdm(blocks, desc="sensitivity", unit="block", disable=not progress)
    for block in bar:
        model = model_factory()
        report = binarize_(model, BinarizeSpec(**{**asdict(spec), "include": [block]}))
        model.to(device)
        acc_ptb = _accuracy(model, test_loader, device)
        row = {"block": block, "layers_binarized": len(report.binarized), "params_binarized": report.binary_params,
               "acc_fp": acc_fp, "acc_ptb": acc_ptb, "drop_ptb": acc_fp - acc_ptb}
        if bat_steps:
            torch.manual_seed(0)  # every block trains from the same seed
            _bat(model, bat_loader, bat_steps, lr, device)
            row["acc_bat"] = _accuracy(model, test_loader, device)
            row["drop_bat"] = acc_fp - row["acc_bat"]
        rows.append(row)
        bar.set_postfix(block=block, drop=f"{100 * row.get('drop_bat', row['drop_ptb']):.1f}")
        del model
    return rows


# --------------------------------------------------------------------------------------------------------
# heatmap


def _layout(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """(row labels, column labels, block -> cell) in the manner of Figure 3.

    Transformers: an attn row and an mlp row, one column per block. Staged CNNs (`layer2.1`): one row
    per stage, one column per block index. Anything else: one row.
    """
    parts = [n.rpartition(".") for n in names]
    if all(p[0] and p[2] in TRANSFORMER_PARTS for p in parts):
        prefixes = list(dict.fromkeys(p[0] for p in parts))
        cols = [re.sub(r"\b(?:layers|blocks|stages)\.", "", p) or p for p in prefixes]
        return list(TRANSFORMER_PARTS), cols, {
            n: (TRANSFORMER_PARTS.index(p[2]), prefixes.index(p[0])) for n, p in zip(names, parts)}
    if all(p[0] and p[2].isdigit() for p in parts):
        stages = list(dict.fromkeys(p[0] for p in parts))
        width = max(int(p[2]) for p in parts) + 1
        return stages, [str(i) for i in range(width)], {
            n: (stages.index(p[0]), int(p[2])) for n, p in zip(names, parts)}
    return [""], names, {n: (0, i) for i, n in enumerate(names)}


def heatmap(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Figure 3: accuracy drop per block (points) as a colour map, warmer = larger drop, values annotated.

    One panel for PTB and, when the rows have them, one for BAT.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        raise ValueError("no rows to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r["block"] for r in rows]
    row_labels, col_labels, cells = _layout(names)
    panels = [("drop_ptb", "PTB")] + ([("drop_bat", "BAT")] if "drop_bat" in rows[0] else [])

    fig_w = min(max(6.5, 2.5 + 0.75 * len(col_labels)), 24)
    fig_h = 0.9 + len(panels) * (0.55 * len(row_labels) + 0.9)
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, fig_h), squeeze=False)
    cmap = plt.get_cmap("YlOrRd").with_extremes(bad="0.92")
    for ax, (key, label) in zip(axes[:, 0], panels):
        grid = np.full((len(row_labels), len(col_labels)), np.nan)
        for r in rows:
            grid[cells[r["block"]]] = 100.0 * r[key]
        finite = grid[np.isfinite(grid)]
        vmin, vmax = min(0.0, float(finite.min())), max(float(finite.max()), 1e-6)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = (v - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=0 if len(col_labels) < 16 else 90, fontsize=8)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=9)
        ax.set_xlabel("block" if row_labels[0] in TRANSFORMER_PARTS or len(row_labels) == 1 else "block in stage")
        ax.set_title(f"{label}: accuracy drop when only that block is binarized", fontsize=10)
        fig.colorbar(image, ax=ax, label="drop (points)", fraction=0.04, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------------------
# stage


@dataclass
class SensitivityConfig:
    weight: str | dict = "bnn++"
    activation: str | dict | None = None
    scaling: str = "layer"
    blocks: list[str] | None = None  # None: `blocks(model)`
    eval_limit: int | None = None  # the first N test samples only
    bat_steps: int = 0  # 0: PTB only
    bat_lr: float = 1e-4
    batch_size: int = 256

    def __post_init__(self):
        BinarizeSpec(weight=self.weight, activation=self.activation, scaling=self.scaling)
        if self.blocks is not None and (
                isinstance(self.blocks, str) or not self.blocks or not all(isinstance(b, str) for b in self.blocks)):
            raise ValueError(f"blocks must be None or a non-empty list of module-name patterns, got {self.blocks!r}")
        for key, low in (("eval_limit", 1), ("bat_steps", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if (value is not None or key != "eval_limit") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.bat_lr, (int, float)) or not self.bat_lr > 0:
            raise ValueError(f"bat_lr must be a positive number, got {self.bat_lr!r}")


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)  # MLflow's allowed characters


def _log_mlflow(ctx: StageContext, files: list[Path], rows: list[dict]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(ctx.tracking_uri)
    for f in files:
        client.log_artifact(ctx.run_id, str(f))
    now = int(time.time() * 1000)
    metrics = [Metric(f"drop.{_metric_key(r['block'])}", float(r["drop_ptb"]), now, 0) for r in rows]
    metrics += [Metric(f"drop_bat.{_metric_key(r['block'])}", float(r["drop_bat"]), now, 0)
                for r in rows if "drop_bat" in r]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(ctx.run_id, metrics=metrics[i:i + 1000])


def _worst(rows: list[dict], key: str) -> dict:
    return max(rows, key=lambda r: r[key])  # the first of equals


def run(cfg: dict, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """The sensitivity stage: one PTB (and optional BAT) evaluation per block of the teacher."""
    c = build(SensitivityConfig, cfg)
    missing = [k for k in ("teacher", "data") if k not in inputs]
    if missing:
        raise ValueError(f"sensitivity needs inputs 'teacher' and 'data'; missing: {', '.join(missing)}")
    teacher, data = inputs["teacher"], inputs["data"]
    recipe = json.loads(teacher.file("recipe.json").read_text())
    name, kwargs = recipe["name"], dict(recipe.get("kwargs") or {})
    template = models.create(name, **kwargs)
    models.load_checkpoint(template, teacher.file("model.pt"))
    template.eval()

    from stages.data import load_manifest, make_loader

    test_dir = Path(data.path) / "test"
    manifest = load_manifest(test_dir)
    classes = getattr(template, "num_classes", None)
    if classes is not None and classes != manifest["num_classes"]:
        raise ValueError(f"teacher {name} has {classes} classes but the test shards {test_dir} have "
                         f"{manifest['num_classes']}")
    size = manifest.get("image_size")
    image_size = kwargs.get("img_size") or (size[0] if size and size[0] == size[1] else 32)
    norm = models.normalization(name)
    loader_kw = dict(batch_size=c.batch_size, mean=norm.mean, std=norm.std, image_size=image_size)
    limit = None if c.eval_limit is None else min(c.eval_limit, manifest["num_samples"])
    test_loader = make_loader(test_dir, train=False, epoch_length=limit, **loader_kw)
    bat_loader = make_loader(Path(data.path) / "train", train=True, **loader_kw) if c.bat_steps else None

    patterns = c.blocks if c.blocks is not None else blocks(template)
    rows = scan(lambda: copy.deepcopy(template), patterns, test_loader, weight=c.weight, activation=c.activation,
                scaling=c.scaling, bat_loader=bat_loader, bat_steps=c.bat_steps, lr=c.bat_lr,
                progress=bool(ctx.extra.get("progress", True)))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, out / CSV_NAME)
    baseline = rows[0]["acc_fp"]
    binarized = f"{_qname(c.weight)} weights" + (f", {_qname(c.activation)} activations" if c.activation else "")
    title = (f"{name}, {binarized}, one block binarized at a time\n"
             f"full precision {100 * baseline:.2f}% on {test_loader.epoch_length} test images")
    png_path = heatmap(rows, out / PNG_NAME, title=title)
    worst = _worst(rows, "drop_ptb")
    metrics = {"baseline_acc": baseline, "worst_block": worst["block"], "worst_drop": worst["drop_ptb"],
               "num_blocks": len(rows)}
    if c.bat_steps:
        worst_bat = _worst(rows, "drop_bat")
        metrics.update(worst_block_bat=worst_bat["block"], worst_drop_bat=worst_bat["drop_bat"])
    if ctx.run_id and ctx.tracking_uri:
        _log_mlflow(ctx, [csv_path, png_path], rows)
    return metrics


def _qname(spec) -> str:
    return spec if isinstance(spec, str) else spec.get("name", "?") if isinstance(spec, dict) else "none"

