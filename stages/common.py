"""Helpers the pipeline stages share: model files, evaluation on shards, MLflow logging of a stage."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pcpp import models
from pcpp.surgery import binarize_
from stages.artifact import Artifact, StageContext


def save_model(out: Path, model: torch.nn.Module, recipe: dict, binarize: dict | None = None) -> None:
    """model.pt (state dict), recipe.json (how to build it), binarize.json (the spec, if binarized)."""
    torch.save(model.state_dict(), out / "model.pt")
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    if binarize is not None:
        (out / "binarize.json").write_text(json.dumps(binarize, indent=1))


def recipe_of(model_cfg) -> dict:
    return {"name": model_cfg.name, "kwargs": {**model_cfg.kwargs, "num_classes": model_cfg.num_classes}}


def load_model(artifact: Artifact) -> torch.nn.Module:
    """Rebuild the model an artifact stores (binarized when it carries binarize.json)."""
    recipe = json.loads(artifact.file("recipe.json").read_text())
    model = models.create(recipe["name"], **recipe.get("kwargs", {}))
    if "binarize.json" in artifact.manifest["files"]:
        binarize_(model, json.loads(artifact.file("binarize.json").read_text()))
    models.load_checkpoint(model, artifact.file("model.pt"))
    return model


def shard_dirs(data: Artifact) -> tuple[Path, Path]:
    return data.path / "train", data.path / "test"


def accuracy(model: torch.nn.Module, shard_dir: Path, model_name: str, *, limit: int | None = None,
             batch_size: int = 256, honest: bool = True) -> float:
    """Top-1 accuracy on a shard directory (the honest binarized network for binarized models)."""
    from stages.data import make_loader
    from stages.engine import evaluate

    norm = models.normalization(model_name)
    loader = make_loader(shard_dir, train=False, batch_size=batch_size, epoch_length=limit,
                         mean=norm.mean, std=norm.std)
    correct, total = evaluate(model, loader, next(model.parameters()).device, honest=honest)
    return correct / max(total, 1)


def log_to_run(ctx: StageContext, metrics: dict | None = None, files: list[Path] | None = None,
               params: dict | None = None) -> None:
    """Metrics, params and files to the stage's MLflow child run (when tracking is on)."""
    if not (ctx.run_id and ctx.tracking_uri):
        return
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)):
            client.log_metric(ctx.run_id, k, float(v))
    for k, v in (params or {}).items():
        client.log_param(ctx.run_id, k[:250], str(v)[:6000])
    for f in files or []:
        client.log_artifact(ctx.run_id, str(f))
