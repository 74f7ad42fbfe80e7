"""`pcpp sweep`: Ray Tune with ASHA over the mu / rho schedules and the learning rate.

The Tune-calls-Train pattern: each trial runs the one training engine (a TorchTrainer with DeepSpeed
workers) and forwards its per-epoch reports to Tune (TuneReportCallback), so ASHA can stop weak trials
early. The data and teacher stages of the base pipeline run once (cached) and every trial reads them.
Each trial is an MLflow run nested under the sweep's run; the best configuration is written as a
pipeline YAML that `pcpp run` accepts.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.local import ensure_ray, resolve
from pipelines.config import PipelineConfig, load_pipeline
from pipelines.runner import run as run_pipeline
from stages.config import apply_overrides, build, read_yaml

SEARCHABLE = ("mu0", "muT", "rho0", "rhoT", "lr")


@dataclass
class Range:
    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"a search range needs finite low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")


@dataclass
class SchedulerConfig:
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    pipeline: str = ""  # the base pipeline YAML
    overrides: list = field(default_factory=list)
    search: dict = field(default_factory=dict)  # name -> Range; names: mu0, muT, rho0, rhoT, lr
    num_samples: int = 4
    max_concurrent_trials: int = 2
    epochs: int = 2  # ASHA's max_t: the epochs of a trial that is never stopped
    metric: str = "binary_acc"
    mode: str = "max"
    seed: int = 0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    out: str = ""  # where the best pipeline YAML goes (default: <root>/sweeps/<name>-best.yaml)

    def __post_init__(self):
        unknown = sorted(set(self.search) - set(SEARCHABLE))
        if unknown:
            raise ValueError(f"unknown search parameters {unknown}; valid: {', '.join(SEARCHABLE)}")
        self.search = {k: v if isinstance(v, Range) else build(Range, v, f"search.{k}") for k, v in self.search.items()}
        if self.mode not in ("max", "min"):
            raise ValueError(f"unknown mode {self.mode!r}; valid: max, min")
        if self.num_samples < 1 or self.max_concurrent_trials < 1 or self.epochs < 1:
            raise ValueError("num_samples, max_concurrent_trials and epochs must be >= 1")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, PipelineConfig]:
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        sweep = build(SweepConfig, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if not sweep.pipeline:
        raise ValueError(f"{path}: 'pipeline' (the base pipeline YAML) is required")
    base = load_pipeline(resolve(sweep.pipeline), list(sweep.overrides))
    return sweep, base


def apply_trial(base: dict, values: dict) -> dict:
    """The base pipeline dict with a trial's mu / rho / lr applied where the pair or rule has them."""
    d = copy.deepcopy(base)
    weight = d["binarize"]["weight"]
    weight = {"name": weight} if isinstance(weight, str) else dict(weight)
    from pcpp.quantizers import get

    params = get(weight["name"]).param_schedules
    if "mu" in params and ("mu0" in values or "muT" in values):
        cur = params["mu"]
        weight["mu"] = {"kind": "linear", "start": values.get("mu0", cur.start), "end": values.get("muT", cur.end)}
    rho = {"kind": "linear", "start": values.get("rho0", 0.01), "end": values.get("rhoT", 10.0)}
    if "rho" in params and ("rho0" in values or "rhoT" in values):
        weight["rho"] = rho
    if d["train"]["rule"] in ("pq", "rpc") and ("rho0" in values or "rhoT" in values):
        d["train"]["rule_params"] = {**d["train"].get("rule_params", {}), "rho": rho}
    d["binarize"]["weight"] = weight
    if "lr" in values:
        d["train"]["optim"]["lr"] = values["lr"]
    return d


def _trial(config: dict) -> None:
    """One Tune trial: the engine on the cached data / teacher artifacts, reporting to Tune per epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from stages.artifact import StageContext, load_artifact
    from stages.engine import fit
    from stages.train import _train_config

    pc = build(PipelineConfig, apply_trial(config["base"], config["values"]))
    inputs = {k: load_artifact(Path(v)) for k, v in config["inputs"].items()}
    ctx = StageContext(root=Path(config["root"]), tracking_uri=config["tracking_uri"],
                       experiment=pc.tracking.experiment, parent_run_id=config["parent_run_id"])
    t = pc.train
    train_dir, test_dir = inputs["data"].path / "train", inputs["data"].path / "test"
    cfg = _train_config(pc, "trial", t.seed, t.pipeline, inputs["teacher"].file("model.pt"), None, train_dir,
                        test_dir, pc.binarize, t.rule, t.rule_params, t.optim, config["epochs"], t.optim.lr,
                        t.distill, ctx)
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(config["root"]) / "sweeps" / config["sweep_name"] / trial_id
    result = fit(cfg, run_dir=run_dir, parent_run_id=config["parent_run_id"], run_name=f"trial {trial_id}",
                 callbacks=[TuneReportCallback()],
                 run_tags={"pcpp.trial": trial_id, **{f"pcpp.search.{k}": str(v) for k, v in config["values"].items()}})
    if not result.ok:
        raise RuntimeError(result.message)


@dataclass
class SweepResult:
    best_values: dict
    best_metric: float
    best_yaml: Path
    trials: list[dict]
    parent_run_id: str

    @property
    def stopped_early(self) -> int:
        return sum(1 for t in self.trials if t["epochs"] < t["max_epochs"])


def sweep(cfg: SweepConfig, base: PipelineConfig) -> SweepResult:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Data and teacher once, through the pipeline's cache.
    prefix = run_pipeline(base, only=["teacher"])
    root = base.root_path
    uri = prefix.tracking_uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(base.tracking.experiment)
    name = f"{base.name}-sweep-{base.digest()[:8]}"
    parent = client.create_run(exp.experiment_id, tags={MLFLOW_RUN_NAME: name, "pcpp.kind": "sweep"}).info.run_id
    for k, r in cfg.search.items():
        client.log_param(parent, f"search.{k}", f"{'log' if r.log else 'uniform'}[{r.low}, {r.high}]")

    # Sampled here from a seeded generator, then given to Tune as a grid: a sweep is reproducible.
    rng = random.Random(cfg.seed)
    samples = [{k: math.exp(rng.uniform(math.log(r.low), math.log(r.high))) if r.log else rng.uniform(r.low, r.high)
                for k, r in cfg.search.items()} for _ in range(cfg.num_samples)]
    ensure_ray()
    trainable = tune.with_resources(_trial, {"cpu": 0.1})  # the trial only drives; its Train workers hold CPUs
    tuner = tune.Tuner(
        trainable,
        param_space={"values": tune.grid_search(samples), "base": base.to_dict(), "epochs": cfg.epochs,
                     "root": str(root),
                     "inputs": {k: str(a.path) for k, a in prefix.artifacts.items()}, "tracking_uri": uri,
                     "parent_run_id": parent, "sweep_name": name},
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, num_samples=1,
            max_concurrent_trials=cfg.max_concurrent_trials,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.scheduler.grace_period,
                                    reduction_factor=cfg.scheduler.reduction_factor),
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(root / "tune")),
    )
    grid = tuner.fit()
    trials = []
    for r in grid:
        epochs = int((r.metrics or {}).get("epoch", 0))
        trials.append({"values": r.config["values"], "epochs": epochs, "max_epochs": cfg.epochs,
                       "metric": (r.metrics or {}).get(cfg.metric), "error": str(r.error) if r.error else None})
    _close_trial_runs(client, root / "sweeps" / name, cfg.epochs)
    best = grid.get_best_result(metric=cfg.metric, mode=cfg.mode, scope="last")
    best_values = best.config["values"]
    best_dict = apply_trial(base.to_dict(), best_values)
    best_dict["name"] = f"{base.name}-best"
    out = Path(cfg.out) if cfg.out else root / "sweeps" / f"{name}-best.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best of sweep {name}: {cfg.metric} = {best.metrics.get(cfg.metric)} ({cfg.mode}) with "
              f"{json.dumps(best_values)}\n# Run it with: pcpp run {out}\n")
    out.write_text(header + yaml.safe_dump(best_dict, sort_keys=False))
    client.log_artifact(parent, str(out))
    client.log_metric(parent, f"best_{cfg.metric}", float(best.metrics.get(cfg.metric, float("nan"))))
    client.set_terminated(parent, "FINISHED")
    return SweepResult(best_values, best.metrics.get(cfg.metric), out, trials, parent)


def _close_trial_runs(client, sweep_dir: Path, max_epochs: int) -> None:
    """Tune ends a trial at its last report (ASHA's max_t, or a stop decision) before the engine closes its
    MLflow run: close it here, KILLED and tagged stopped_early when it ran fewer epochs than the budget."""
    for id_file in sweep_dir.glob("*/mlflow_run_id"):
        run_id = id_file.read_text().strip()
        if client.get_run(run_id).info.status != "RUNNING":
            continue
        history = id_file.parent / "epochs.jsonl"
        done = len(history.read_text().splitlines()) if history.exists() else 0
        early = done < max_epochs
        client.set_tag(run_id, "pcpp.status", "stopped_early" if early else "finished")
        client.set_tag(run_id, "pcpp.epochs_done", str(done))
        client.set_terminated(run_id, "KILLED" if early else "FINISHED")


def format_trials(result: SweepResult, metric: str) -> str:
    lines = [f"{'trial':<6} {'epochs':>6} {metric:>12}  values"]
    for i, t in enumerate(result.trials):
        m = t["metric"]
        lines.append(f"{i:<6} {t['epochs']:>6} {m if m is None else f'{m:.4f}':>12}  "
                     + ", ".join(f"{k}={v:.4g}" for k, v in t["values"].items())
                     + (f"  ERROR {t['error'][:80]}" if t["error"] else ""))
    lines.append(f"{result.stopped_early} of {len(result.trials)} trials stopped early by ASHA")
    lines.append(f"best: {json.dumps(result.best_values)} -> {result.best_yaml}")
    return "\n".join(lines)


__all__ = ["Range", "SweepConfig", "apply_trial", "format_trials", "load_sweep", "sweep"]
