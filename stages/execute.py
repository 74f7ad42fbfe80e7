"""One stage run through the cache: its key, a cache hit or a run and a commit, its MLflow child run.

The pipeline runner (pipelines.runner) calls `run_stage` for every stage task of its Ray DAG; a stage that runs
other stages inside it (the frontier's points: a train and an export stage each) calls it too, so those are
cached, keyed and tracked exactly as the pipeline's own stages are.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from stages import registry, tracking
from stages.artifact import Artifact, StageContext, cached, commit, stage_key
from stages.tracking import one_line

__all__ = ["run_stage"]


def _child_run(ctx: StageContext, stage: str, key: str, cached_hit: bool, label: str, tags: dict) -> str | None:
    if not ctx.tracking_uri or not ctx.parent_run_id:
        return None
    run = tracking.start_run(ctx.tracking_uri, ctx.experiment, Path(ctx.root) / "mlartifacts", run_name=label,
                             parent_run_id=ctx.parent_run_id,
                             tags={"pcpp.stage": stage, "pcpp.stage_key": key, "pcpp.cached": str(cached_hit).lower(),
                                   **tags})
    return run.run_id


def _end_child(ctx: StageContext, status: str, artifact: Artifact | None = None, message: str = "") -> None:
    if not ctx.run_id:
        return
    run = tracking.Run(ctx.tracking_uri, ctx.run_id)
    if artifact is not None:
        run.set_tags({"pcpp.artifact": str(artifact.path)})
        run.log_metrics(artifact.metrics)
    run.finish(status, message)


def nested(ctx: StageContext) -> StageContext:
    """The context for stages a stage runs itself (run_stage inside a stage): their MLflow runs, and their
    trainings', nest under the running stage's run."""
    return dataclasses.replace(ctx, parent_run_id=ctx.run_id or ctx.parent_run_id, run_id=None)


def run_stage(name: str, config, ctx: StageContext, inputs: dict[str, Artifact], *, label: str | None = None,
              tags: dict | None = None) -> tuple[Artifact, dict]:
    """Run stage `name` (stages.registry) on its own `config` and `inputs`, or take its cached artifact.

    The key is stages.artifact.stage_key(name, config, inputs); a verified artifact under it is a cache hit.
    Otherwise the stage writes into a temporary directory that is committed (renamed) when it returns.
    `label` names the stage in the console lines (`stage LABEL: started`) and its MLflow child run (nested
    under ctx.parent_run_id, tagged pcpp.stage / pcpp.stage_key / pcpp.cached, plus `tags`); default: the
    name. Returns (artifact, info: stage, cached, seconds, key). The stage's errors propagate, after its
    child run is marked FAILED and its temporary directory removed."""
    label = label or name
    key = stage_key(name, config, inputs)
    hit = cached(ctx.root, name, key)
    ctx = dataclasses.replace(ctx, extra={**ctx.extra, "key": key, "label": label})  # label: its training run's name
    ctx.run_id = _child_run(ctx, name, key, hit is not None, label, tags or {})
    if hit is not None:
        _end_child(ctx, "FINISHED", hit)
        print(f"stage {label}: cached ({key})", flush=True)
        return hit, {"stage": name, "cached": True, "seconds": 0.0, "key": key}
    print(f"stage {label}: started", flush=True)  # one line each: start, end or failure (quiet console)
    started = time.time()
    out = ctx.root / "artifacts" / f".tmp-{name}-{key}-{int(started * 1000)}"
    out.mkdir(parents=True)
    try:
        metrics = registry.get(name).load()(config, inputs, out, ctx)
        artifact = commit(ctx.root, name, key, config, inputs, out, metrics, started)
    except BaseException as e:
        shutil.rmtree(out, ignore_errors=True)
        _end_child(ctx, "FAILED", message=f"{type(e).__name__}: {e}")
        print(f"stage {label}: failed after {time.time() - started:.1f} s: {one_line(e)}", flush=True)
        raise
    _end_child(ctx, "FINISHED", artifact)
    print(f"stage {label}: finished in {time.time() - started:.1f} s", flush=True)
    return artifact, {"stage": name, "cached": False, "seconds": round(time.time() - started, 1), "key": key}
