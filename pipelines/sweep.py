"""`pcpp sweep`: Ray Tune with ASHA over any values of the base pipeline's config (pipelines.sweep_space).

The Tune-calls-Train pattern: each trial runs the one training engine (a TorchTrainer with DeepSpeed
workers) and forwards its per-epoch reports to Tune (TuneReportCallback), so ASHA can stop weak trials
early. The data and teacher stages of the base pipeline run once (cached) and every trial reads them.
Each trial is an MLflow run nested under the sweep's run; the best configuration is written as a
pipeline YAML that `pcpp run` accepts. Failures are handled inside a trial, by the engine: the base
pipeline's `distributed.max_failures` / `storage_path` / `checkpoints_to_keep` apply to every trial's
TorchTrainer, so a trial whose worker dies is restarted by Ray Train from its last reported epoch (its
checkpoints under the trial's run directory, or `storage_path`) and Tune sees each epoch once.

The search space is Tune's own (pipelines.sweep_space): `searcher: random` samples it with Tune's
BasicVariantGenerator (grid_search included), `searcher: optuna` with Optuna's TPE through Tune's
OptunaSearch; both seeded by `seed`, so the sampled configs are reproducible.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.local import check_resources, ensure_ray
from pipelines.config import PipelineConfig, load_pipeline
from pipelines.runner import run as run_pipeline
from pipelines.sweep_space import SEARCHERS, Space, apply_values, parse_search, search_alg, trial_values
from stages import tracking
from stages.config import PATH, ConfigError, absolute, apply_overrides, build, located, read_yaml
from stages.engine import EPOCH_METRICS
from stages.storage import FAULT_ENV, restarts
from stages.tracking import one_line

TRIAL_CPU = 0.1  # the Tune trial itself only drives its Train workers, which hold the CPUs


@dataclass
class SchedulerConfig:
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    pipeline: str = field(default="", metadata=PATH)  # the base pipeline YAML
    overrides: list[str] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)  # dotted path -> space (pipelines.sweep_space)
    searcher: str = "random"  # random (Tune's BasicVariantGenerator, grid included) | optuna (TPE)
    num_samples: int = 4
    max_concurrent_trials: int = 2
    epochs: int = 2  # ASHA's max_t: the epochs of a trial that is never stopped
    metric: str = "binary_acc"  # one of the per-epoch metrics the trials report (stages.engine.EPOCH_METRICS)
    mode: str = "max"
    seed: int = 0  # seeds the searcher: the same sweep samples the same configs
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    out: str = field(default="", metadata=PATH)  # the best pipeline YAML (default: <root>/sweeps/<name>-best.yaml)

    def __post_init__(self):
        if not isinstance(self.overrides, list):
            raise ValueError(f"overrides must be a list of key=value strings, got {self.overrides!r}")
        if self.searcher not in SEARCHERS:
            close = difflib.get_close_matches(self.searcher, SEARCHERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown searcher {self.searcher!r}{hint}; valid: {', '.join(SEARCHERS)}")
        if not self.search:
            raise ValueError("search is empty: give at least one path with a space, e.g. "
                             "search: {train.optim.lr: {loguniform: [1e-4, 1e-2]}}")
        if self.metric not in EPOCH_METRICS:
            close = difflib.get_close_matches(self.metric, EPOCH_METRICS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"metric {self.metric!r} is not one the trials report{hint}; valid: "
                             f"{', '.join(EPOCH_METRICS)}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"unknown mode {self.mode!r}; valid: max, min")
        if self.num_samples < 1 or self.max_concurrent_trials < 1 or self.epochs < 1:
            raise ValueError("num_samples, max_concurrent_trials and epochs must be >= 1")
        if self.scheduler.grace_period < 1 or self.scheduler.reduction_factor < 2:
            raise ValueError("scheduler.grace_period must be >= 1 and scheduler.reduction_factor >= 2")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, PipelineConfig]:
    """Read and check a sweep YAML and its base pipeline: every problem is reported before anything runs."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        sweep = absolute(build(SweepConfig, data))
    except ConfigError as e:
        raise located(path, overrides, e) from None
    if not sweep.pipeline:
        raise ValueError(f"{path}: 'pipeline' (the base pipeline YAML) is required")
    base = load_pipeline(sweep.pipeline, list(sweep.overrides))
    try:
        spaces(sweep, base)
    except ConfigError as e:
        raise ConfigError([f"{path}: {x}" for x in e.errors]) from None
    return sweep, base


def spaces(cfg: SweepConfig, base: PipelineConfig) -> dict[str, Space]:
    """The sweep's search spaces by dotted path, checked against the base pipeline (ConfigError)."""
    return parse_search(cfg.search, base, cfg.searcher)


def apply_trial(base: dict, values: dict) -> dict:
    """The base pipeline dict with a trial's values (dotted paths) applied (pipelines.sweep_space)."""
    return apply_values(base, values)


def _trial(config: dict, *, setup: dict) -> None:
    """One Tune trial: the engine on the cached data / teacher artifacts, reporting to Tune per epoch.

    The trial leaves its MLflow run open: only the sweep's driver knows, after Tune returns, whether the
    scheduler stopped it, so only the driver sets the run's final status (no race with this process).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from stages.artifact import StageContext
    from stages.engine import fit
    from stages.train import bind

    values = trial_values(config)
    trial_id = ray.tune.get_context().get_trial_id()
    if setup.get("fault"):  # the driver's test hook (stages.storage), for the engine inside this trial
        os.environ[FAULT_ENV] = setup["fault"]
    pc = build(PipelineConfig, apply_trial(setup["base"], values))
    inputs = setup["inputs"]  # data and teacher (no pretrain), verified once by the sweep's driver
    ctx = StageContext(root=Path(setup["root"]), tracking_uri=setup["tracking_uri"],
                       experiment=pc.tracking.experiment, pipeline_name=pc.name, parent_run_id=setup["parent_run_id"])
    cfg = bind(pc.stage_config("train"), inputs, ctx, "trial")  # the train stage's config, trained for ASHA's max_t
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=setup["epochs"]))
    run_dir = Path(setup["root"]) / "sweeps" / setup["sweep_name"] / trial_id
    result = fit(cfg, run_dir=run_dir, parent_run_id=setup["parent_run_id"], run_name=f"trial {trial_id}",
                 callbacks=[TuneReportCallback()], close_run=False,
                 run_tags={"pcpp.trial": trial_id,
                           **{f"pcpp.search.{k}": str(v) for k, v in values.items()}})
    if not result.ok:
        raise RuntimeError(result.message)


@dataclass
class SweepResult:
    best_values: dict
    best_metric: float
    best_yaml: Path
    trials: list[dict]  # also written beside best_yaml as <name>-trials.yaml
    parent_run_id: str

    @property
    def stopped_early(self) -> int:
        return sum(1 for t in self.trials if t["status"] == "stopped")


class SweepFailed(RuntimeError):
    pass


class SweepInterrupted(SweepFailed):
    """Tune returned with trials unfinished (interrupted): the sweep resumes when rerun."""


def sweep(cfg: SweepConfig, base: PipelineConfig) -> SweepResult:
    """Run the sweep; whatever fails, no MLflow run of it is left RUNNING."""
    base = absolute(base)
    base.check_files()
    ensure_ray()
    cfg = _fit_concurrency(cfg, base)
    prefix = run_pipeline(base, only=["teacher"])  # data and teacher once, through the pipeline's cache
    root = base.root_path
    uri = prefix.tracking_uri
    client = tracking.client(uri)
    name = sweep_name(cfg, base)
    sweep_dir, experiment_dir = root / "sweeps" / name, root / "tune" / name
    # A rerun of the same sweep (same base, same search) resumes it: Tune's experiment state (trials, the
    # searcher's, ASHA's) from `experiment_dir`, each unfinished trial's training from its last epoch, and
    # the same MLflow parent run; a sweep that finished returns its results again without training.
    from ray import tune

    resuming = tune.Tuner.can_restore(str(experiment_dir))
    parent = tracking.reuse_run(client, sweep_dir) if resuming else None
    if parent is None:
        parent = tracking.start_run(uri, base.tracking.experiment, root / "mlartifacts", run_name=name,
                                    tags={"pcpp.kind": "sweep"}).run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / tracking.RUN_ID_FILE).write_text(parent)
    if resuming:
        print(f"{name}: resuming the sweep in {experiment_dir} (MLflow run {parent}); trials that failed stay "
              f"failed (delete that directory to start over)", file=sys.stderr, flush=True)
    run = tracking.Run(uri, parent)
    try:
        result = _run_trials(cfg, base, client, uri, parent, name, prefix, experiment_dir if resuming else None)
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SweepInterrupted))
        _close_leftovers(client, parent, "KILLED" if interrupted else "FAILED", one_line(e))
        run.finish("KILLED" if interrupted else "FAILED", one_line(e))
        raise
    run.finish("FINISHED")
    return result


def _fit_concurrency(cfg: SweepConfig, base: PipelineConfig) -> SweepConfig:
    """One trial must fit on the cluster (else refused, one line); on a loopback cluster, no more trials run
    side by side than it holds (the others would wait on their workers' placement, timing out and retrying)."""
    import ray

    from cluster.local import cluster_is_loopback

    d = base.distributed
    per_trial = {"CPU": TRIAL_CPU + (0 if d.use_gpu else d.num_workers), **({"GPU": d.num_workers} if d.use_gpu
                                                                           else {})}
    check_resources(per_trial, f"a sweep trial (distributed.num_workers={d.num_workers})")
    have = ray.cluster_resources()
    fits = int(min(have.get(k, 0.0) / v for k, v in per_trial.items()) + 1e-9)
    if cluster_is_loopback() and 1 <= fits < cfg.max_concurrent_trials:
        print(f"notice: {fits} trial(s) at a time: the Ray cluster holds {fits} x {per_trial} "
              f"(max_concurrent_trials is {cfg.max_concurrent_trials})", file=sys.stderr, flush=True)
        return dataclasses.replace(cfg, max_concurrent_trials=fits)
    return cfg


def sweep_name(cfg: SweepConfig, base: PipelineConfig) -> str:
    """`<pipeline>-sweep-<digest>`: the digest covers the base pipeline (all of it: PipelineConfig.digest) and
    what decides the trials (search, searcher, seed, num_samples, epochs, metric, mode, scheduler), not
    max_concurrent_trials or `out`; so a rerun of the same sweep finds its experiment (and resumes it), and a
    changed sweep starts its own."""
    decides = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("pipeline", "overrides", "out", "max_concurrent_trials")}
    blob = json.dumps({"base": base.digest(), "sweep": decides}, sort_keys=True, default=str)
    return f"{base.name}-sweep-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _run_trials(cfg: SweepConfig, base: PipelineConfig, client, uri: str, parent: str, name: str, prefix,
                restore: Path | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    root = base.root_path
    space = spaces(cfg, base)
    if restore is None:  # a resumed sweep's run has them already
        for k, s in space.items():
            client.log_param(parent, f"search.{k}", s.describe()[:6000])
        client.log_param(parent, "searcher", cfg.searcher)
        client.log_param(parent, "search_seed", cfg.seed)
    # Tune's own searchers, seeded: the same sweep YAML samples the same configs.
    param_space, alg = search_alg(space, cfg.searcher, cfg.seed, cfg.metric, cfg.mode, cfg.max_concurrent_trials)
    setup = {"base": base.to_dict(), "epochs": cfg.epochs, "root": str(root), "tracking_uri": uri,
             "inputs": dict(prefix.artifacts), "parent_run_id": parent,
             "sweep_name": name, "fault": os.environ.get(FAULT_ENV)}
    # `setup` goes into Ray's object store once (tune.with_parameters), with the data and teacher artifacts
    # as the driver verified them: no trial hashes the shards again (150 MB for CIFAR-10, per trial).
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {"cpu": TRIAL_CPU})
    if restore is not None:  # unfinished trials continue (errored ones stay errors: a rerun would fail again)
        tuner = tune.Tuner.restore(str(restore), trainable=trainable, resume_unfinished=True, param_space=param_space)
        return _finish_trials(cfg, base, client, parent, name, tuner.fit())
    tuner = tune.Tuner(
        trainable,  # the search space is the sampled values alone; what every trial shares goes in `setup`
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, trial_dirname_creator=_trial_dirname,
            search_alg=alg,  # it holds max_concurrent_trials (Tune ignores the TuneConfig's for a generator)
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.scheduler.grace_period,
                                    reduction_factor=cfg.scheduler.reduction_factor),
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(root / "tune"), verbose=1),
    )
    return _finish_trials(cfg, base, client, parent, name, tuner.fit())


def _finish_trials(cfg: SweepConfig, base: PipelineConfig, client, parent: str, name: str, grid) -> SweepResult:
    """Close the trials' MLflow runs, pick the best trial, write the best YAML and the trials summary."""
    root = base.root_path
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished:  # Tune returns early on a first Ctrl-C / SIGUSR1: not a result, an interruption
        raise SweepInterrupted(f"sweep {name} interrupted with {unfinished} of {len(grid)} trials unfinished: "
                               "rerun the same command to resume it")
    trials = _close_trial_runs(client, parent, grid, cfg, root / "sweeps" / name)
    ok = [t for t in trials if t["status"] in ("finished", "stopped") and _finite(t["metric"])]
    if not ok:
        first = next((t["error"] for t in trials if t["error"]), f"no trial reported a finite {cfg.metric}")
        raise SweepFailed(f"no trial of sweep {name} finished ({len(trials)} trials): {first}")
    finished = [t for t in ok if t["status"] == "finished"]  # compared at the same epoch when there are any
    best = (max if cfg.mode == "max" else min)(finished or ok, key=lambda t: t["metric"])
    best_values = best["values"]
    best_dict = apply_values(base.to_dict(), best_values)
    best_dict["name"] = f"{base.name}-best"
    out = Path(cfg.out) if cfg.out else root / "sweeps" / f"{name}-best.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best of sweep {name}: {cfg.metric} = {best['metric']} ({cfg.mode}) with "
              f"{json.dumps(best_values)}\n# Run it with: pcpp run {out}\n")
    out.write_text(header + yaml.safe_dump(best_dict, sort_keys=False))
    client.log_artifact(parent, str(out))
    summary = out.with_name(out.name.removesuffix("-best.yaml").removesuffix(".yaml") + "-trials.yaml")
    summary.write_text(f"# Trials of sweep {name} ({cfg.searcher}, seed {cfg.seed}), in Tune's order\n"
                       + yaml.safe_dump({"metric": cfg.metric, "mode": cfg.mode, "best": dict(best_values),
                                         "trials": trials}, sort_keys=False))
    client.log_artifact(parent, str(summary))
    client.log_metric(parent, f"best_{cfg.metric}", float(best["metric"]))
    return SweepResult(best_values, best["metric"], out, trials, parent)


def _trial_dirname(trial) -> str:
    """`<n>_<trial id>`: n, Tune's creation counter of the trial, orders the trials (their `sample`)."""
    return f"{int(trial.experiment_tag.split('_')[0]):05d}_{trial.trial_id}"


def _in_order(grid) -> list[tuple[str, object]]:
    """(trial id, result) in the order Tune created the trials (their directory names, _trial_dirname)."""
    named = [(Path(r.path).name.split("_", 1), r) for r in grid]
    return [(trial_id, r) for (_, trial_id), r in sorted(named, key=lambda x: int(x[0][0]))]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _trial_runs(client, parent: str) -> dict[int, object]:
    exp_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)
    return {r.data.tags["pcpp.trial"]: r for r in runs if "pcpp.trial" in r.data.tags}


def _close_trial_runs(client, parent: str, grid, cfg: SweepConfig, sweep_dir: Path) -> list[dict]:
    """Every trial's MLflow run ends with the status Tune's outcome gives it, set here, after Tune returned.

    finished: all epochs ran (FINISHED); stopped: the scheduler ended it early (KILLED, tag
    pcpp.stopped_early); diverged / refused: its last report says so (the engine reports a diverged epoch, or
    the activation guard's refusal, and writes result.json before it; FAILED); failed: the trial raised
    (FAILED, with the one-line message).
    The trials never set these themselves, so the outcome does not depend on which process is faster.
    """
    runs = _trial_runs(client, parent)
    trials = []
    for sample, (trial_id, r) in enumerate(_in_order(grid)):
        metrics = r.metrics or {}
        run = runs.get(trial_id)
        result_file = sweep_dir / trial_id / "result.json"
        outcome = json.loads(result_file.read_text()) if result_file.exists() else {}
        epochs = int(outcome.get("epochs_done", metrics.get("epoch", 0)) or 0)
        error = one_line(r.error) if r.error else None
        ended = next((s for s in ("diverged", "refused") if metrics.get(s) or outcome.get("status") == s), None)
        if ended:  # refused: the activation guard's, before training (stages.activations)
            status, error = ended, outcome.get("message") or error or f"{ended} (the trial's result.json is missing)"
        elif error:
            status = "failed"
        else:
            status = "finished" if epochs >= cfg.epochs else "stopped"
        trials.append({"sample": sample, "trial_id": trial_id, "values": trial_values(r.config), "epochs": epochs,
                       "max_epochs": cfg.epochs, "metric": metrics.get(cfg.metric),
                       "forward_binary_gap": metrics.get("forward_binary_gap"), "status": status, "error": error})
        if run is None:  # the trial failed before its run existed
            continue
        client.set_tag(run.info.run_id, "pcpp.status", status)
        client.set_tag(run.info.run_id, "pcpp.sample", str(sample))
        client.set_tag(run.info.run_id, "pcpp.epochs_done", str(epochs))
        client.set_tag(run.info.run_id, "pcpp.stopped_early", str(status == "stopped").lower())
        # Ray Train's restarts of the trial's workers (the trial may be ended by Tune before its engine tags it)
        trial_dir = sweep_dir / trial_id
        client.set_tag(run.info.run_id, "pcpp.restarts", str(restarts(trial_dir)))
        if error:
            client.set_tag(run.info.run_id, "pcpp.message", error[:5000])
        client.set_terminated(run.info.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))
    return sorted(trials, key=lambda t: t["sample"])


def _close_leftovers(client, parent: str, status: str, message: str) -> None:
    """After a failure of the sweep itself: no trial run stays RUNNING."""
    try:
        runs = _trial_runs(client, parent)
    except Exception as e:  # the store itself failed: nothing more can be closed
        print(f"warning: could not close the trial runs of sweep run {parent}: {one_line(e)}", file=sys.stderr)
        return
    for run in runs.values():
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "pcpp.status", "failed" if status == "FAILED" else "stopped")
            client.set_tag(run.info.run_id, "pcpp.message", f"sweep ended: {message}"[:5000])
            client.set_terminated(run.info.run_id, status)


def format_trials(result: SweepResult, metric: str) -> str:
    lines = [f"{'trial':<6} {'epochs':>6} {metric:>12} {'fwd-bin gap':>12}  values"]
    for i, t in enumerate(result.trials):
        m, gap = t["metric"], t.get("forward_binary_gap")
        lines.append(f"{i:<6} {t['epochs']:>6} {m if m is None else f'{m:.4f}':>12} "
                     f"{gap if gap is None else f'{gap:.4f}':>12}  "
                     + ", ".join(f"{k}={_shown(v)}" for k, v in t["values"].items())
                     + f"  {t['status']}" + (f": {t['error'][:100]}" if t["error"] else ""))
    lines.append(f"{result.stopped_early} of {len(result.trials)} trials stopped early by ASHA")
    lines.append(f"best: {json.dumps(result.best_values)} -> {result.best_yaml}")
    return "\n".join(lines)


def _shown(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


__all__ = ["SweepConfig", "SweepFailed", "apply_trial", "format_trials", "load_sweep", "spaces", "sweep"]
