"""Training stages: binarized pre-training (protocol 3) and FT / E2E PC++ training, through the engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from stages.artifact import Artifact, StageContext, work_dir
from stages.common import load_model, log_to_run, recipe_of, save_model, shard_dirs
from stages.config import TrainConfig
from stages.engine import fit


class StageFailed(RuntimeError):
    """A training stage ended without finishing (diverged or failed); its checkpoints stay for a resume."""


def run_engine(pc, inputs: dict[str, Artifact], ctx: StageContext, *, stage: str, binarize, pipeline: str,
               epochs: int, lr: float, init: Path | None, teacher: Path | None = None, rule: str = "pc++",
               rule_params: dict | None = None, distill=None, optim=None, seed: int = 0):
    train_dir, test_dir = shard_dirs(inputs["data"])
    cfg = _train_config(pc, stage, seed, pipeline, teacher, init, train_dir, test_dir, binarize, rule, rule_params,
                        optim, epochs, lr, distill, ctx)
    run_dir = work_dir(ctx.root, stage, ctx.extra["key"]) / "run"
    result = fit(cfg, run_dir=run_dir, parent_run_id=ctx.parent_run_id, run_name=f"{stage} (training)",
                 fail_after_epoch=ctx.extra.get("fail_after_epoch"))
    if not result.ok:
        raise StageFailed(f"{stage}: {result.message} (checkpoints kept in {run_dir})")
    from pcpp import models
    from pcpp.surgery import binarize_

    model = models.create(pc.model.name, num_classes=pc.model.num_classes, **pc.model.kwargs)
    if binarize is not None:
        binarize_(model, binarize)
    models.load_checkpoint(model, run_dir / "final" / "model.pt")
    return result, model


def _train_config(pc, stage, seed, pipeline, teacher, init, train_dir, test_dir, binarize, rule, rule_params,
                  optim, epochs, lr, distill, ctx) -> TrainConfig:
    from stages.config import build

    d = pc.data
    data = {"train": str(train_dir), "test": str(test_dir), "batch_size": d.batch_size, "num_workers": d.num_workers,
            "epoch_length": d.epoch_length, "eval_limit": d.eval_limit}
    optim_d = dataclasses.asdict(optim) if optim is not None else {}
    optim_d.update({"epochs": epochs, "lr": lr})
    return build(TrainConfig, {
        "name": f"{pc.name}-{stage}", "seed": seed, "pipeline": pipeline,
        "teacher": str(teacher) if teacher else None, "init": str(init) if init else None,
        "model": dataclasses.asdict(pc.model), "data": data,
        "binarize": None if binarize is None else dataclasses.asdict(binarize),
        "algorithm": {"rule": rule, "params": rule_params or {}}, "optim": optim_d,
        "distill": dataclasses.asdict(distill) if distill is not None else {},
        "distributed": dataclasses.asdict(pc.distributed),
        "tracking": {"experiment": ctx.experiment, "tracking_uri": ctx.tracking_uri, "run_root": str(ctx.root)},
    })


def _pipeline(cfg: dict):
    from pipelines.config import PipelineConfig
    from stages.config import build

    return build(PipelineConfig, cfg["pipeline"])


def run_pretrain(cfg: dict, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """Binarized pre-training from the teacher for a few epochs (protocol 3 of section 4.3)."""
    pc = _pipeline(cfg)
    teacher = inputs["teacher"].file("model.pt")
    result, model = run_engine(pc, inputs, ctx, stage="pretrain", binarize=pc.binarize, pipeline="ft",
                               epochs=pc.pretrain.epochs, lr=pc.pretrain.lr, init=None, teacher=teacher,
                               seed=pc.train.seed)
    save_model(out, model, recipe_of(pc.model), dataclasses.asdict(pc.binarize))
    log_to_run(ctx, result.metrics)
    return result.metrics


def run_train(cfg: dict, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """FT (from the teacher, or from the pre-trained binarized model) or E2E training with PC++."""
    pc = _pipeline(cfg)
    t = pc.train
    teacher = inputs["teacher"].file("model.pt")
    init = inputs["pretrain"].file("model.pt") if "pretrain" in inputs else None
    pipeline = t.pipeline
    if pipeline == "e2e":
        init = None
    result, model = run_engine(pc, inputs, ctx, stage="train", binarize=pc.binarize, pipeline=pipeline,
                               epochs=t.optim.epochs, lr=t.optim.lr, init=init, teacher=teacher, rule=t.rule,
                               rule_params=t.rule_params, distill=t.distill, optim=t.optim, seed=t.seed)
    save_model(out, model, recipe_of(pc.model), dataclasses.asdict(pc.binarize))
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    log_to_run(ctx, result.metrics)
    return result.metrics


__all__ = ["StageFailed", "load_model", "run_engine", "run_pretrain", "run_train"]
