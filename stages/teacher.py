"""Teacher stage: the full-precision model, from a file, an MLflow model URI, timm weights, or trained.

Its accuracy on the test shards is measured and recorded; a missing or mismatched checkpoint is an
error naming the file, raised before any training starts (the teacher is the first model stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.local import resolve
from pcpp import models
from pcpp.evaluation import accuracy
from stages.artifact import Artifact, StageContext
from stages.common import log_to_run, recipe_of, save_model, shard_dirs
from stages.config import ModelConfig, TrainConfig
from stages.schema import PATH

SOURCES = ("file", "mlflow", "timm", "train")


@dataclass
class TeacherConfig:
    """The teacher stage's config: where the full-precision model comes from, what it is, how many test
    samples score it, and (source `train`) the full training run that makes it."""

    source: str = "file"  # file | mlflow | timm | train
    path: str | None = field(default=None, metadata=PATH)  # file: a checkpoint; timm: a weights file (or HF cache)
    uri: str | None = None  # mlflow: a model URI (runs:/<id>/model, models:/<name>/<version>)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval_limit: int | None = None  # score on the first N test samples only
    training: TrainConfig | None = None  # source train: E2E full-precision training (binarize: null)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"unknown teacher.source {self.source!r}; valid: {', '.join(SOURCES)}")
        if self.source == "file" and not self.path:
            raise ValueError("teacher.source 'file' needs teacher.path")
        if self.source == "mlflow" and not self.uri:
            raise ValueError("teacher.source 'mlflow' needs teacher.uri (e.g. runs:/<run id>/model)")
        if (self.source == "train") != (self.training is not None):
            raise ValueError("teacher.source 'train' and a training config go together")


def _from_mlflow(uri: str, tracking_uri: str | None) -> dict:
    """The state dict of the MLflow model at `uri`; runs:/ and models:/ URIs are looked up in the pipeline's
    store `tracking_uri`, set for this call only (the process's store is restored after)."""
    import os

    import mlflow
    import mlflow.pytorch

    previous = os.environ.get("MLFLOW_TRACKING_URI")  # mlflow.set_tracking_uri keeps it equal to its own
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu").state_dict()
    except Exception as e:
        raise ValueError(f"teacher: cannot load MLflow model {uri!r}: {type(e).__name__}: {e}") from None
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous)  # None: unset again


def _from_timm(name: str, kwargs: dict, path: str | None) -> torch.nn.Module:
    import timm

    overlay = {"file": str(resolve(path))} if path else None
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # offline: no file given and nothing in the local HF cache
        where = f"the file {resolve(path)}" if path else "the local Hugging Face cache (HF_HUB_OFFLINE=1)"
        raise ValueError(f"teacher: cannot load timm weights of {name!r} from {where}: {e}") from None


def run(cfg: TeacherConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """Input `data`; writes the teacher's model files and its accuracy on the test shards."""
    from stages.data import eval_loader

    m = cfg.model
    recipe = recipe_of(m)  # how to build it: {"name", "kwargs"} (pcpp.models.load)
    _, test_dir = shard_dirs(inputs["data"])
    if cfg.source == "train":
        return _train(cfg, inputs, out, ctx)
    if cfg.source == "timm":
        model = _from_timm(m.name, recipe["kwargs"], cfg.path)
    elif cfg.source == "file":
        model = models.load(recipe, weights=resolve(cfg.path))
    else:
        model = models.load(recipe, weights=_from_mlflow(cfg.uri, ctx.tracking_uri))
    acc = accuracy(model, eval_loader(test_dir, m.name, limit=cfg.eval_limit))
    save_model(out, model, recipe)
    metrics = {"accuracy": acc}
    log_to_run(ctx, metrics, params={"teacher.source": cfg.source, "teacher.path": cfg.path, "teacher.uri": cfg.uri})
    return metrics


def _train(cfg: TeacherConfig, inputs, out, ctx) -> dict:
    """Full-precision E2E training through the engine (teacher.source: train)."""
    from stages.train import bind, run_engine

    result, model = run_engine(bind(cfg.training, inputs, ctx, "teacher"), ctx, stage="teacher")
    save_model(out, model, recipe_of(cfg.model))
    acc = result.metrics.get("binary_acc", 0.0)
    log_to_run(ctx, {"accuracy": acc})
    return {"accuracy": acc}
