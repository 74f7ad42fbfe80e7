"""Sensitivity stage: the scan of pcpp.sensitivity on the teacher, with its config, data, files and figure.

Inputs `teacher` (its model files) and `data` (shard directories `test/` and, for BAT, `train/`); writes
`sensitivity.csv` (one row per block, pcpp.sensitivity.scan's columns) and `sensitivity.png` (Figure 3,
stages.plots.heatmap), and logs both with `drop.<block>` metrics to the stage's MLflow run.
Accuracies are fractions in [0, 1]; `drop_*` = acc_fp - acc_*.
"""

from __future__ import annotations

import copy
import csv
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tqdm import tqdm

from pcpp import models
from pcpp.sensitivity import blocks, scan, worst
from pcpp.surgery import BinarizeSpec
from stages.activations import CALIBRATION_BATCHES  # as a training run calibrates its thresholds
from stages.artifact import Artifact, StageContext
from stages.common import load_model
from stages.plots import heatmap

CSV_NAME = "sensitivity.csv"
PNG_NAME = "sensitivity.png"

__all__ = ["CSV_NAME", "PNG_NAME", "SensitivityConfig", "read_csv", "run", "write_csv"]


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """`rows` as CSV; numbers to 12 decimals (a drop is a difference of two fractions: 0.15, not the
    0.1499999999999999 of its float), far below the 1e-9 that ranks them apart (pcpp.mixed.TIE_DIGITS)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 12) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return path


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a sensitivity CSV (`write_csv`'s), values as text: `block`, `params_binarized`, `drop_ptb`,
    ... (pcpp.mixed.rank reads them). FileNotFoundError naming a missing file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sensitivity CSV {path} does not exist")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class SensitivityConfig:
    """The scan's config (the pipeline's `sensitivity` section without `enabled`): the quantizers of the
    binarized block, which blocks, how many test samples, and the optional BAT."""

    weight: str | dict = "bnn++"
    activation: str | dict | None = None
    scaling: str = "layer"
    blocks: list[str] | None = None  # None: `blocks(model)`
    eval_limit: int | None = None  # the first N test samples only
    bat_steps: int = 0  # 0: PTB only
    bat_lr: float = 1e-4
    batch_size: int = 256
    # field -> role of the quantizer specs: stage keys hash them as they resolve (stages.config.keyed_dict)
    QUANTIZER_ROLES: ClassVar[dict[str, str]] = BinarizeSpec.QUANTIZER_ROLES

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
    from mlflow.entities import Metric

    from stages.tracking import client as mlflow_client

    client = mlflow_client(ctx.tracking_uri)
    for f in files:
        client.log_artifact(ctx.run_id, str(f))
    now = int(time.time() * 1000)
    metrics = [Metric(f"drop.{_metric_key(r['block'])}", float(r["drop_ptb"]), now, 0) for r in rows]
    metrics += [Metric(f"drop_bat.{_metric_key(r['block'])}", float(r["drop_bat"]), now, 0)
                for r in rows if "drop_bat" in r]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(ctx.run_id, metrics=metrics[i:i + 1000])


def run(cfg: SensitivityConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """The sensitivity stage: one PTB (and optional BAT) evaluation per block of the teacher."""
    missing = [k for k in ("teacher", "data") if k not in inputs]
    if missing:
        raise ValueError(f"sensitivity needs inputs 'teacher' and 'data'; missing: {', '.join(missing)}")
    template = load_model(inputs["teacher"]).eval()
    recipe = template.pcpp_recipe  # {"name", "kwargs"}: how the teacher was built
    name, kwargs = recipe["name"], dict(recipe.get("kwargs") or {})

    from stages.data import LoaderConfig, load_manifest, make_loader

    data = Path(inputs["data"].path)
    test_dir = data / "test"
    manifest = load_manifest(test_dir)
    classes = getattr(template, "num_classes", None)
    if classes is not None and classes != manifest["num_classes"]:
        raise ValueError(f"teacher {name} has {classes} classes but the test shards {test_dir} have "
                         f"{manifest['num_classes']}")
    size = manifest.get("image_size")
    image_size = kwargs.get("img_size") or (size[0] if size and size[0] == size[1] else 32)
    norm = models.normalization(name)
    batches = LoaderConfig(batch_size=cfg.batch_size, mean=norm.mean, std=norm.std, image_size=image_size)
    limit = None if cfg.eval_limit is None else min(cfg.eval_limit, manifest["num_samples"])
    test_loader = make_loader(test_dir, batches, train=False, epoch_length=limit)
    bat_loader = make_loader(data / "train", batches, train=True) if cfg.bat_steps else None
    calibration = None
    if cfg.activation is not None:  # thresholds of BWA blocks: the channel medians on 4 training batches
        calibration = list(itertools.islice(iter(make_loader(data / "train", batches, train=False)),
                                            CALIBRATION_BATCHES))

    patterns = cfg.blocks if cfg.blocks is not None else blocks(template)
    bar = tqdm(total=len(patterns), desc="sensitivity", unit="block", disable=not ctx.extra.get("progress", True))

    def shown(row: dict) -> None:
        bar.set_postfix(block=row["block"], drop=f"{100 * row.get('drop_bat', row['drop_ptb']):.1f}")
        bar.update()

    with bar:
        rows = scan(lambda: copy.deepcopy(template), patterns, test_loader, weight=cfg.weight,
                    activation=cfg.activation, scaling=cfg.scaling, bat_loader=bat_loader, bat_steps=cfg.bat_steps,
                    lr=cfg.bat_lr, on_row=shown, calibration_batches=calibration)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, out / CSV_NAME)
    baseline = rows[0]["acc_fp"]
    binarized = f"{_qname(cfg.weight)} weights" + (f", {_qname(cfg.activation)} activations" if cfg.activation else "")
    title = (f"{name}, {binarized}, one block binarized at a time\n"
             f"full precision {100 * baseline:.2f}% on {test_loader.epoch_length} test images")
    png_path = heatmap(rows, out / PNG_NAME, title=title)
    top = worst(rows, "drop_ptb")
    metrics = {"baseline_acc": baseline, "worst_block": top["block"], "worst_drop": top["drop_ptb"],
               "num_blocks": len(rows)}
    if cfg.bat_steps:
        top_bat = worst(rows, "drop_bat")
        metrics.update(worst_block_bat=top_bat["block"], worst_drop_bat=top_bat["drop_bat"])
    if ctx.run_id and ctx.tracking_uri:
        _log_mlflow(ctx, [csv_path, png_path], rows)
    return metrics


def _qname(spec) -> str:
    return spec if isinstance(spec, str) else spec.get("name", "?") if isinstance(spec, dict) else "none"
