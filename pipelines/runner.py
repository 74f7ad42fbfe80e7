"""The pipeline as a Ray DAG of stage tasks, with our own artifact cache (ray.workflow is gone in 2.60).

data -> teacher -> pretrain (optional) -> train -> export, and teacher -> sensitivity (-> pretrain and train
when binarize.keep_fp is a policy; -> frontier, which also waits for train and export). Each stage task
receives its own typed config (PipelineConfig.stage_configs) and its inputs' artifacts; its key hashes
exactly that config and the inputs' digests (stages.artifact.stage_key). A verified artifact under that
key is a cache hit and the stage is skipped, so a crashed or stopped pipeline resumes where it stopped
(a training stage also resumes inside, from its last epoch checkpoint). MLflow: one parent run per
pipeline run, one child per stage (cache hits too, tagged `pcpp.cached`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.local import check_resources, ensure_ray, tracking_uri
from pipelines.config import PipelineConfig
from stages import registry, tracking
from stages.artifact import Artifact, StageContext
from stages.config import absolute
from stages.execute import run_stage
from stages.tracking import one_line


@dataclass
class StagePlan:
    name: str
    deps: list[str]  # the stages whose artifacts it reads
    config: object  # the stage's own config (stages.registry: an instance of its config type)


def plan(pc: PipelineConfig) -> list[StagePlan]:
    """The enabled stages, each with its own config and the inputs it reads, in dependency order (the
    pipeline's order, a stage moved after the stages its config makes it read: train after sensitivity
    when binarize.keep_fp is a policy). ValueError when a stage reads a stage that is not enabled."""
    enabled = pc.enabled()
    configs = pc.stage_configs()
    pending = [StagePlan(name, registry.get(name).inputs_for(configs[name], enabled), configs[name])
               for name in enabled]
    out: list[StagePlan] = []
    while pending:
        ready = next((s for s in pending if all(d in {o.name for o in out} for d in s.deps)), None)
        if ready is None:
            raise ValueError(f"stages {[s.name for s in pending]} read each other: no order runs them")
        out.append(ready)
        pending.remove(ready)
    return out


def execute_stage(name: str, config, ctx: StageContext, dep_names: list[str], *deps) -> tuple[Artifact, dict]:
    """Run one stage (or take its cached artifact), its inputs the (artifact, info) results of its deps'
    tasks; returns (artifact, info) (stages.execute.run_stage)."""
    return run_stage(name, config, ctx, {n: d[0] for n, d in zip(dep_names, deps)})


@dataclass
class PipelineResult:
    artifacts: dict[str, Artifact]
    info: list[dict]
    run_id: str | None
    tracking_uri: str
    seconds: float


def run(pc: PipelineConfig, *, log: bool = True, only: list[str] | None = None,
        inject_failure: dict[str, int] | None = None, on_ray_ready=None) -> PipelineResult:
    """Validate, build the Ray DAG and execute it; returns the artifacts of every stage.

    `only` runs just those stages and what they depend on (e.g. ["teacher"] for a sweep's inputs).
    `inject_failure` ({"train": 1}) makes a training stage crash after that epoch (tests of resume).
    Relative paths in `pc` are taken from the working directory (here, once). Whatever fails, the
    parent run ends FAILED (KILLED on Ctrl-C), never RUNNING.
    """
    pc = absolute(pc)
    pc.check_files()
    pc.check_keep_fp()
    root = pc.root_path
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root, pc.tracking.tracking_uri)
    parent = _parent_run(pc, uri, root) if log else None
    try:
        ctx = StageContext(root=root, tracking_uri=uri if log else None, experiment=pc.tracking.experiment,
                           pipeline_name=pc.name, parent_run_id=parent)
        return _execute(pc, ctx, uri, only, inject_failure, on_ray_ready)
    except PipelineFailed as e:
        _finish_parent(uri, parent, "FAILED", str(e))
        raise
    except BaseException as e:
        _finish_parent(uri, parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", one_line(e))
        raise


def _execute(pc: PipelineConfig, ctx: StageContext, uri: str, only, inject_failure, on_ray_ready) -> PipelineResult:
    stages = plan(pc)
    if only:
        unknown = sorted(set(only) - {s.name for s in stages})
        if unknown:
            raise ValueError(f"unknown or disabled stages {unknown}; this pipeline has: "
                             f"{', '.join(s.name for s in stages)}")
        needed = set()
        for s in reversed(stages):
            if s.name in only or s.name in needed:
                needed.update([s.name, *s.deps])
        stages = [s for s in stages if s.name in needed]
    ray = ensure_ray()
    if on_ray_ready is not None:  # after ray.init, which installs signal handlers of its own
        on_ray_ready()
    if {"pretrain", "train"} & {s.name for s in stages} or pc.teacher.source == "train":
        d = pc.distributed  # the training stages' workers: refused now, not after the data stage
        check_resources({"GPU": d.num_workers} if d.use_gpu else {"CPU": d.num_workers},
                        f"distributed.num_workers={d.num_workers}" + (" with use_gpu" if d.use_gpu else ""))
    task = ray.remote(num_cpus=0, max_retries=0)(execute_stage)
    # The DAG on Ray: each stage task takes its upstream stages' ObjectRefs, so Ray runs a stage as soon
    # as its inputs exist (sensitivity beside pretrain / train) and fails downstream stages with it.
    refs = {}
    started = time.time()
    for s in stages:
        stage_ctx = ctx
        if inject_failure and s.name in inject_failure:
            stage_ctx = dataclasses.replace(ctx, extra={"fail_after_epoch": inject_failure[s.name]})
        refs[s.name] = task.options(name=f"stage:{s.name}").remote(
            s.name, s.config, stage_ctx, s.deps, *[refs[d] for d in s.deps])
    _IN_FLIGHT[:] = list(refs.values())
    try:
        results = ray.get([refs[s.name] for s in stages])
    except Exception as e:
        raise PipelineFailed(_one_line(e)) from None
    artifacts = {s.name: r[0] for s, r in zip(stages, results)}
    info = [r[1] for r in results]
    _finish_parent(uri, ctx.parent_run_id, "FINISHED", "", info, artifacts)
    return PipelineResult(artifacts, info, ctx.parent_run_id, uri, time.time() - started)


class PipelineFailed(RuntimeError):
    pass


_IN_FLIGHT: list = []


def cancel_in_flight() -> None:
    """Force-cancel the running stage tasks: their worker processes die, and with them the Ray Train runs they
    own, so a stopped pipeline does not keep training beside its resubmission (checkpoints stay on disk)."""
    import ray

    for ref in _IN_FLIGHT:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # already finished, or Ray is going down
            pass


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line.split(":")[0] or "Failed" in line), None)
    return cause or (lines[-1] if lines else type(e).__name__)


def _parent_run(pc: PipelineConfig, uri: str, root: Path) -> str:
    run = tracking.start_run(uri, pc.tracking.experiment, root / "mlartifacts", run_name=pc.name,
                             tags={"pcpp.kind": "pipeline", "pcpp.config_digest": pc.digest()})
    cfg_file = root / f"pipeline-{pc.digest()}.yaml"
    cfg_file.write_text(pc.to_yaml())
    run.log_files([cfg_file])
    return run.run_id


def _finish_parent(uri, run_id, status, message, info=None, artifacts=None):
    if not run_id:
        return
    run = tracking.Run(uri, run_id)
    for i in info or []:
        run.log_metrics({f"{i['stage']}.seconds": i["seconds"]})
        run.set_tags({f"pcpp.{i['stage']}.cached": str(i["cached"]).lower()})
    for name, a in (artifacts or {}).items():
        run.log_metrics({f"{name}.{k}": v for k, v in a.metrics.items()})
        # figures that are names (sensitivity.worst_block, train.keep_fp_blocks) as tags
        run.set_tags({f"pcpp.{name}.{k}": v[:tracking.MAX_TAG_VALUE] for k, v in a.metrics.items()
                      if isinstance(v, str)})
        files = [a.file(f) for f in registry.get(name).parent_files if f in a.manifest["files"]]
        run.log_files(files, artifact_path=name)  # a stage's headline files (the frontier's CSV and plot)
    run.finish(status, message)


def summary(pc: PipelineConfig, result: PipelineResult) -> str:
    """The printed end-of-run summary: per stage, cached or not, time and headline figures."""
    a = result.artifacts
    lines = [f"pipeline {pc.name}: {len(result.info)} stages in {result.seconds:.1f} s", ""]
    lines.append(f"{'stage':<12} {'status':<8} {'seconds':>8}  figures")
    headline = {"data": ("train_samples", "test_samples"), "teacher": ("accuracy",),
                "pretrain": ("binary_acc", "forward_acc"), "train": ("binary_acc", "forward_acc", "soft_fraction"),
                "sensitivity": ("baseline_acc", "worst_block", "worst_drop"),
                "export": ("ratio_to_fp32", "file_bytes", "reloaded_acc"),
                "frontier": ("points", "fp_accuracy", "binary_accuracy")}
    for i in result.info:
        m = a[i["stage"]].metrics
        figs = ", ".join(f"{k} {m[k]:.4g}" if isinstance(m.get(k), float) else f"{k} {m.get(k)}"
                         for k in headline.get(i["stage"], ()) if k in m)
        lines.append(f"{i['stage']:<12} {'cached' if i['cached'] else 'ran':<8} {i['seconds']:>8.1f}  {figs}")
    lines += ["", f"artifacts: {pc.root_path / 'artifacts'}", f"MLflow store: {result.tracking_uri} "
              f"(parent run {result.run_id})"]
    if result.tracking_uri.startswith("sqlite:///"):
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1 --port 5000")
    if "export" in a:
        lines.append(f"export: {a['export'].path / 'model.safetensors'}")
    if "frontier" in a:
        lines.append(f"frontier: {a['frontier'].path / 'frontier.csv'}, {a['frontier'].path / 'frontier.png'}")
    return "\n".join(lines)


def write_summary(pc: PipelineConfig, result: PipelineResult) -> Path:
    path = pc.root_path / "summary.json"
    path.write_text(json.dumps({"info": result.info, "run_id": result.run_id, "tracking_uri": result.tracking_uri,
                                "metrics": {k: v.metrics for k, v in result.artifacts.items()},
                                "artifacts": {k: str(v.path) for k, v in result.artifacts.items()}}, indent=1))
    return path
