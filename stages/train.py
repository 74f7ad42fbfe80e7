"""Training stages: binarized pre-training (protocol 3) and FT / E2E PC++ training, through the engine.

Each receives its own `TrainConfig` (the one training schema, stages.config) and nothing else; `bind`
fills in what its input artifacts and the run give: the shard directories, the teacher's checkpoint, the
pre-trained student's checkpoint (FT after pre-training), the run's name and MLflow settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from stages.artifact import Artifact, StageContext, work_dir
from stages.common import load_model, log_to_run, recipe_of, save_model, shard_dirs
from stages.config import TrackingConfig, TrainConfig
from stages.engine import fit


class StageFailed(RuntimeError):
    """A training stage ended without finishing (diverged, refused or failed); its checkpoints stay for a resume."""


def bind(cfg: TrainConfig, inputs: dict[str, Artifact], ctx: StageContext, stage: str) -> TrainConfig:
    """`cfg` completed from the stage's inputs and context (the parts a stage key must not hash twice).

    data.train / data.test: the `data` artifact's shard directories; teacher: the `teacher` artifact's
    checkpoint (when the stage has that input); student: the `pretrain` artifact's checkpoint when
    fine-tuning after pre-training; name: `<pipeline>-<stage>`; tracking: the run's experiment, store and root.
    """
    train_dir, test_dir = shard_dirs(inputs["data"])
    teacher = inputs["teacher"].file("model.pt") if "teacher" in inputs else None
    student = inputs["pretrain"].file("model.pt") if "pretrain" in inputs and cfg.init == "teacher" else None
    return dataclasses.replace(
        cfg, name=f"{ctx.pipeline_name}-{stage}", teacher=str(teacher) if teacher else None,
        student=str(student) if student else None,
        data=dataclasses.replace(cfg.data, train=str(train_dir), test=str(test_dir)),
        tracking=TrackingConfig(experiment=ctx.experiment, tracking_uri=ctx.tracking_uri, run_root=str(ctx.root)))


def run_engine(cfg: TrainConfig, ctx: StageContext, *, stage: str):
    """Train `cfg` (bound) in the stage's work directory (a rerun resumes there); (TrainResult, trained model)."""
    run_dir = work_dir(ctx.root, stage, ctx.extra["key"]) / "run"
    name = f"{ctx.extra.get('label') or stage} (training)"  # a frontier point's: "frontier K=1 train (training)"
    result = fit(cfg, run_dir=run_dir, parent_run_id=ctx.parent_run_id, run_name=name,
                 fail_after_epoch=ctx.extra.get("fail_after_epoch"))
    if result.status == "refused":  # before any training: no checkpoint to speak of
        raise StageFailed(f"{stage}: {result.message} (table: {run_dir / 'activation_balance.txt'})")
    if not result.ok:
        from stages.storage import storage_root

        raise StageFailed(f"{stage}: {result.message} (checkpoints kept in {storage_root(cfg, run_dir)})")
    from pcpp import models

    return result, models.load(recipe_of(cfg.model), cfg.binarize, weights=Path(run_dir) / "final" / "model.pt")


def run_pretrain(cfg: TrainConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """Binarized pre-training from the teacher for a few epochs (protocol 3 of section 4.3).

    Inputs `data` and `teacher`; writes the binarized model's files."""
    result, model = run_engine(bind(cfg, inputs, ctx, "pretrain"), ctx, stage="pretrain")
    save_model(out, model, recipe_of(cfg.model), dataclasses.asdict(cfg.binarize))
    log_to_run(ctx, result.metrics)
    return result.metrics


def run_train(cfg: TrainConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """FT (from the teacher, or from the pre-trained binarized model) or E2E training with PC++.

    Inputs `data`, `teacher` and, optionally, `pretrain`; writes the binarized model's files and
    metrics.json."""
    result, model = run_engine(bind(cfg, inputs, ctx, "train"), ctx, stage="train")
    save_model(out, model, recipe_of(cfg.model), dataclasses.asdict(cfg.binarize))
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    log_to_run(ctx, result.metrics)
    return result.metrics


__all__ = ["StageFailed", "bind", "load_model", "run_engine", "run_pretrain", "run_train"]
