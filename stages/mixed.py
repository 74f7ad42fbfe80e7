"""Mixed binarization in the pipeline: the training stages resolve a keep_fp policy and record the decision.

The pretrain and train stages receive the binarize spec as the pipeline wrote it. When its keep_fp is a
policy (`{from_sensitivity: K}`, `{budget_bytes: N}`, `{budget_ratio: R}`), they also read the sensitivity
stage's artifact (stages.registry: `policy_inputs`), turn the policy into patterns (pcpp.mixed.resolve,
the model priced on the meta device) and train with those, as the same stage with the patterns and without
the scan, nested: its key is the one a frontier point or an earlier run that kept the same blocks had, so
that training is cached, and its files are hard-linked into the policy stage's artifact. Whenever keep_fp
keeps something (policy or patterns), the decision is recorded: `keep_fp.json` in the stage's artifact
(policy, ranking, kept blocks, predicted file bytes and ratio to fp32 at the policy's precision, fp32 for
patterns), the MLflow params `keep_fp.policy` / `keep_fp.blocks`, and the metrics `keep_fp_count`,
`keep_fp_predicted_bytes`, `keep_fp_predicted_ratio` and `keep_fp_blocks` (text: a tag
`pcpp.train.keep_fp_blocks` of the parent run).
The export stage reads keep_fp.json back and logs the export's real size next to the prediction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from pcpp.mixed import KeepDecision, resolve
from pcpp.surgery import is_keep_fp_policy
from stages.artifact import MANIFEST, Artifact, StageContext
from stages.common import log_to_run, recipe_of
from stages.config import TrainConfig

KEEP_FP_FILE = "keep_fp.json"

__all__ = ["KEEP_FP_FILE", "check_policies", "decide", "meta_model", "policy_inputs", "run_pretrain", "run_train",
           "with_keep_fp"]


def policy_inputs(cfg: TrainConfig) -> dict[str, str]:
    """{stage: why} of the stages a training config reads beyond its own inputs: the sensitivity scan when
    binarize.keep_fp is a policy (stages.registry's `config_inputs`)."""
    spec = getattr(cfg, "binarize", None)
    if spec is not None and is_keep_fp_policy(spec.keep_fp):
        return {"sensitivity": f"binarize.keep_fp {spec.keep_fp} ranks its blocks"}
    return {}


def meta_model(model_cfg):
    """The full-precision architecture of a config's model section on the meta device: shapes, no storage."""
    import torch

    from pcpp import models

    with torch.device("meta"):
        return models.load(recipe_of(model_cfg))


def decide(cfg: TrainConfig, inputs: dict[str, Artifact], policy=None, precision: str | None = None
           ) -> KeepDecision | None:
    """What `policy` (default cfg.binarize.keep_fp) keeps of the model cfg binarizes, priced at `precision`;
    None when it keeps nothing (no keep_fp). A policy reads inputs["sensitivity"]'s CSV: ValueError naming
    the missing input and how to enable it when there is none."""
    from stages.sensitivity import CSV_NAME, read_csv

    policy = cfg.binarize.keep_fp if policy is None else policy
    if not policy:
        return None
    rows = []
    if is_keep_fp_policy(policy):
        if "sensitivity" not in inputs:
            raise ValueError(f"binarize.keep_fp {policy} ranks the blocks of the sensitivity scan, and this stage "
                             f"has no sensitivity artifact (inputs: {', '.join(sorted(inputs))}): enable the "
                             "sensitivity stage, or give keep_fp as module-name patterns")
        rows = read_csv(inputs["sensitivity"].file(CSV_NAME))
    return resolve(policy, rows, meta_model(cfg.model), cfg.binarize, precision)


NO_BAT = ("ranks by the scan's BAT drops, and the sensitivity scan runs PTB only (sensitivity.bat_steps: 0): set "
          "sensitivity.bat_steps >= 1, or rank by drop_ptb")


def check_policies(cfg: TrainConfig, policies: list[tuple[str, object]], precision: str | None = None,
                   blocks: list[str] | None = None, bat: bool = False) -> None:
    """Refuse, before any stage runs, what a keep_fp policy or pattern list would be refused for once the
    sensitivity scan is there but does not depend on its figures: K beyond the blocks (or every block, leaving
    nothing binarized), a budget that not even the fully binarized export meets, patterns that match no layer.
    `policies`: (where, policy) pairs, `where` prefixes the error (e.g. "frontier point K=20"); `blocks`: the
    blocks the scan will rank (default: all of the model's, pcpp.sensitivity.blocks); `bat`: whether the scan
    runs BAT (sensitivity.bat_steps >= 1), without which `by: drop_bat` has nothing to rank by. ValueError as
    pcpp.mixed.resolve raises it, prefixed."""
    from pcpp.sensitivity import blocks as model_blocks

    model = meta_model(cfg.model)
    names = blocks or model_blocks(model)
    ranked = {"drop_ptb": 0.0, **({"drop_bat": 0.0} if bat else {})}  # the columns the scan will write
    rows = [{"block": b, "params_binarized": 0, **ranked} for b in names]  # any order: none is ranked
    for where, policy in policies:
        if isinstance(policy, dict) and policy.get("by") == "drop_bat" and not bat:
            raise ValueError(f"{where}: by: drop_bat {NO_BAT}")
        try:
            resolve(policy, rows, model, cfg.binarize, precision)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def with_keep_fp(cfg: TrainConfig, blocks: list[str]) -> TrainConfig:
    """`cfg` with binarize.keep_fp set to the patterns `blocks`."""
    return dataclasses.replace(cfg, binarize=dataclasses.replace(cfg.binarize, keep_fp=list(blocks)))


def record(decision: KeepDecision | None, out: Path, ctx: StageContext) -> dict:
    """keep_fp.json in `out` and in the stage's MLflow run with its params; the metrics to add to the stage's
    ({} without one)."""
    if decision is None:
        return {}
    path = Path(out) / KEEP_FP_FILE
    path.write_text(json.dumps(decision.to_dict(), indent=1))
    log_to_run(ctx, files=[path], params={"keep_fp.policy": json.dumps(decision.policy),
                                          "keep_fp.blocks": ",".join(decision.blocks),
                                          "keep_fp.precision": decision.precision})
    return {"keep_fp_count": len(decision.blocks), "keep_fp_blocks": ",".join(decision.blocks),
            "keep_fp_predicted_bytes": decision.predicted_bytes, "keep_fp_predicted_ratio": decision.predicted_ratio}


def _run(stage: str, cfg: TrainConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    from stages import train

    decision = decide(cfg, inputs)
    if decision is not None and is_keep_fp_policy(cfg.binarize.keep_fp):
        print(f"stage {stage}: keep_fp {decision.policy} {decision.describe()}", flush=True)
        return {**_train_blocks(stage, cfg, decision.blocks, inputs, out, ctx), **record(decision, out, ctx)}
    run = train.run_pretrain if stage == "pretrain" else train.run_train
    metrics = run(cfg, inputs, out, ctx)
    return {**metrics, **record(decision, out, ctx)}


def _train_blocks(stage: str, cfg: TrainConfig, blocks: list[str], inputs: dict[str, Artifact], out: Path,
                  ctx: StageContext) -> dict:
    """A policy's training with its resolved `blocks`: the stage with them as patterns and without what the
    policy read (policy_inputs: the scan), so the stage key a frontier point or an earlier run that kept the
    same blocks has (cached then), nested under this stage's MLflow run; its files are hard-linked into `out`
    (copied across file systems). Its metrics."""
    from stages.execute import nested, run_stage

    own = {k: a for k, a in inputs.items() if k not in policy_inputs(cfg)}
    trained, _ = run_stage(stage, with_keep_fp(cfg, blocks), nested(ctx), own,
                           label=f"{stage} keeping {', '.join(blocks)}")
    shutil.copytree(trained.path, out, dirs_exist_ok=True, copy_function=_link,
                    ignore=shutil.ignore_patterns(MANIFEST, KEEP_FP_FILE))  # the policy's keep_fp.json is written
    return dict(trained.metrics)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def run_pretrain(cfg: TrainConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """stages.train.run_pretrain with binarize.keep_fp resolved (a policy: from inputs["sensitivity"])."""
    return _run("pretrain", cfg, inputs, out, ctx)


def run_train(cfg: TrainConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """stages.train.run_train with binarize.keep_fp resolved (a policy: from inputs["sensitivity"]); its
    artifact holds keep_fp.json when keep_fp keeps something."""
    return _run("train", cfg, inputs, out, ctx)
