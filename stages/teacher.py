"""Teacher stage: the full-precision model, from a file, an MLflow model URI, timm weights, or trained.

Its accuracy on the test shards is measured and recorded; a missing or mismatched checkpoint is an
error naming the file, raised before any training starts (the teacher is the first model stage).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.local import resolve
from pcpp import models
from stages.artifact import Artifact, StageContext
from stages.common import accuracy, log_to_run, recipe_of, save_model, shard_dirs


def _from_mlflow(uri: str, tracking_uri: str | None) -> dict:
    import mlflow.pytorch

    if tracking_uri:  # runs:/ and models:/ URIs are looked up in the pipeline's store, not the process default
        mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as e:
        raise ValueError(f"teacher: cannot load MLflow model {uri!r}: {type(e).__name__}: {e}") from None
    return model.state_dict()


def _from_timm(name: str, kwargs: dict, path: str | None) -> torch.nn.Module:
    import timm

    overlay = {"file": str(resolve(path))} if path else None
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # offline: no file given and nothing in the local HF cache
        where = f"the file {resolve(path)}" if path else "the local Hugging Face cache (HF_HUB_OFFLINE=1)"
        raise ValueError(f"teacher: cannot load timm weights of {name!r} from {where}: {e}") from None


def run(cfg: dict, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    from pipelines.config import PipelineConfig
    from stages.config import build

    pc = build(PipelineConfig, cfg["pipeline"])
    t, m = pc.teacher, pc.model
    recipe = recipe_of(m)
    _, test_dir = shard_dirs(inputs["data"])
    if t.source == "train":
        metrics = _train(pc, inputs, out, ctx)
        return metrics
    if t.source == "timm":
        model = _from_timm(m.name, recipe["kwargs"], t.path)
    else:
        model = models.create(m.name, **recipe["kwargs"])
        if t.source == "file":
            models.load_checkpoint(model, resolve(t.path))
        else:
            state = _from_mlflow(t.uri, ctx.tracking_uri)
            tmp = out / "mlflow_state.pt"
            torch.save(state, tmp)
            models.load_checkpoint(model, tmp)
            tmp.unlink()
    acc = accuracy(model, test_dir, m.name, limit=pc.data.eval_limit)
    save_model(out, model, recipe)
    metrics = {"accuracy": acc}
    log_to_run(ctx, metrics, params={"teacher.source": t.source, "teacher.path": t.path, "teacher.uri": t.uri})
    return metrics


def _train(pc, inputs, out, ctx) -> dict:
    """Full-precision E2E training through the engine (teacher.source: train)."""
    from stages.train import run_engine

    result, model = run_engine(pc, inputs, ctx, stage="teacher", binarize=None, pipeline="e2e",
                               epochs=pc.teacher.epochs, lr=pc.teacher.lr, init=None)
    save_model(out, model, recipe_of(pc.model))
    acc = result.metrics.get("binary_acc", 0.0)
    log_to_run(ctx, {"accuracy": acc})
    return {"accuracy": acc}
