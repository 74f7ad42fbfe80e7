"""The one training engine: Ray Train (TorchTrainer, Train V2) workers, each driving a DeepSpeed engine.

Used by binarized pre-training, FT, E2E and the Tune sweeps alike. Each worker runs one
`stages.training.TrainingRun` (setup / train_epoch / evaluate / save_checkpoint / cleanup, torchtune's
recipe shape): schedules at progress_at(step, total steps), the rule's hooks around DeepSpeed's step through
pcpp.rules.RuleOptimizer, honest binarized evaluation per epoch (pcpp.evaluation), every rank's DeepSpeed
shard reported to Ray Train as the epoch's checkpoint (persisted under `distributed.storage_path`, at most
`distributed.checkpoints_to_keep` kept; stages.storage), metrics to MLflow on rank 0 (stages.tracking).
Ray restarts a worker group that lost a worker (`distributed.max_failures` times) from the last reported
epoch, and a rerun with the same run directory resumes there too (`ray.train.get_checkpoint()`); the MLflow
run shows every epoch once and its restarts in the tag `pcpp.restarts`. A non-finite loss or weight ends
the run with status `diverged` and a one-line message.

The driver (`fit`) checks everything it can before Ray and MLflow start (stages.preflight): inputs, the
student built on the meta device (the workers build the real one), batches, a resume's ZeRO stage and world
size, then the cluster's resources once Ray is up. Where a run's time goes (`fit(timer=...)`, `pcpp train
--profile-startup`) is measured by the driver and rank 0 (`ProfiledRun`, stages.profile).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local import check_resources, ensure_ray, tracking_uri
from stages.config import TrainConfig, absolute, build, write_run_config
from stages.preflight import check_batches, check_inputs, check_model, check_resume, checkpoint_layout
from stages.profile import EPOCHS, PROFILE, PhaseTimer
from stages.storage import (
    STORAGE_MARK,
    check_storage_unchanged,
    fault_spec,
    ray_run_name,
    restarts,
    storage_root,
    stored_state,
)
from stages.tracking import (
    Run,
    flatten,  # noqa: F401  (public helper of this module)
    start_training_run,
)
from stages.training import (  # noqa: F401  (the names this module has always offered)
    EPOCH_METRICS,
    RESULT,
    TrainingRun,
    build_model,
    build_teacher,
    deepspeed_config,
    epochs_done,
    lr_at,
    make_optimizer,
    schedule_values,
)


@dataclass
class TrainResult:
    status: str  # finished | diverged | refused (activation guard) | failed (| stopped: a sweep's scheduler)
    message: str
    run_dir: str
    run_id: str | None
    metrics: dict
    epochs_done: int
    restarts: int = 0  # worker-group restarts by Ray during this call (FailureConfig(max_failures))
    profile: dict = field(default_factory=dict)  # phase -> seconds (stages.profile; fit's `timer`)

    @property
    def ok(self) -> bool:
        return self.status == "finished"


class ProfiledRun(TrainingRun):
    """A TrainingRun that times its recipe's steps into `timer` (stages.profile): setup's model build and
    DeepSpeed init (its marks), restore, the epochs' training steps, evaluation, checkpoints, logs, cleanup."""

    def __init__(self, *args, timer: PhaseTimer, **kwargs):
        super().__init__(*args, mark=timer.mark, **kwargs)
        self.timer = timer

    def setup(self) -> None:
        self.timer.mark()
        super().setup()
        self.timer.mark("setup: other")

    def restore(self) -> None:
        with self.timer.phase("checkpoint restore"):
            super().restore()

    def train_epoch(self, epoch: int):
        with self.timer.phase(EPOCHS):
            return super().train_epoch(epoch)

    def evaluate(self) -> dict:
        with self.timer.phase("evaluation (forward and honest)"):
            return super().evaluate()

    def recalibrate_bn(self) -> int:
        with self.timer.phase("  of which BatchNorm re-estimation"):
            return super().recalibrate_bn()

    def save_checkpoint(self, epoch: int) -> Path:
        with self.timer.phase("DeepSpeed checkpoint"):
            return super().save_checkpoint(epoch)

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        with self.timer.phase("epoch log (MLflow, epochs.jsonl)"):
            super().log_epoch(epoch, metrics)

    def cleanup(self) -> None:
        with self.timer.phase("final model, result.json"):
            super().cleanup()


def skip_shm_op() -> None:
    """Mark DeepSpeed's shared-memory all-reduce op incompatible, so that its CPU backend does not build it.

    DeepSpeed's torch backend builds the op (g++ through ninja, into ~/.cache/torch_extensions) whenever the
    CPU accelerator is active, for `inference_all_reduce` only, which training never calls. Loading a built op
    costs a ninja check; building it 25-70 s on 2 cores, again whenever another virtual environment built the
    shared cache entry in between (measured: CI clones alternating). Its `__compatible_ops__` dict is cached
    and meant to be edited (deepspeed/ops/__init__.py)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train_worker(config: dict) -> None:
    """Ray Train entry point: one TrainingRun on this worker.

    `config` = {"train": TrainConfig dict, "run_dir", "run_id", "tracking_uri", "fail_after_epoch", "launch",
    "fault"}. Resumes from `ray.train.get_checkpoint()` (after a restart, or a relaunch with the same storage
    path and run name); each epoch's checkpoint is this rank's directory, reported with its metrics. Rank 0
    writes where its time went into `<run dir>/profile.json` (stages.profile), with the wall-clock times it
    entered and left this function.
    """
    entered, timer = time.time(), PhaseTimer()
    import ray
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from stages.storage import checkpoint_dir_name

    ctx = ray.train.get_context()
    run = Run(config["tracking_uri"], config["run_id"]) if config.get("run_id") else None
    with timer.phase("import DeepSpeed"):
        skip_shm_op()

    def report(metrics: dict, checkpoint_dir=None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        with timer.phase("Ray Train report (checkpoint persisted)"):
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)),
                             checkpoint_dir_name=checkpoint_dir_name(int(metrics["epoch"])))
            # Committed only once the controller has every rank's report: a worker killed before that would
            # lose the epoch (measured: a SIGKILL 1.6 s after the report restarted from scratch). Wait for it,
            # so that a restart resumes after the last epoch reported.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    rank = ctx.get_world_rank()
    try:
        ProfiledRun(build(TrainConfig, config["train"]), config["run_dir"], rank=rank,
                    world_size=ctx.get_world_size(), run=run, report=report, resume_from=ray.train.get_checkpoint(),
                    persist=True, fault=config.get("fault"), launch=config.get("launch"),
                    node=ray.get_runtime_context().get_node_id(), timer=timer,
                    ).run(fail_after_epoch=config.get("fail_after_epoch"))
    finally:
        if rank == 0:
            (Path(config["run_dir"]) / PROFILE).write_text(json.dumps(
                {"entered": entered, "left": time.time(), "phases": timer.seconds}))


# -- the driver ----------------------------------------------------------------------------------------
def _failure_message(error: BaseException | None) -> str:
    """One line: the error type and the innermost cause (Ray wraps worker errors in several layers)."""
    if error is None:
        return "failed: the workers ended without writing a result"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1] if lines else "")
    return f"failed: {type(error).__name__}: {cause}"


def fit(cfg: TrainConfig, *, run_dir: str | Path | None = None, parent_run_id: str | None = None,
        run_name: str | None = None, log_to_mlflow: bool = True, fail_after_epoch: int | None = None,
        callbacks: list | None = None, run_tags: dict | None = None, close_run: bool = True,
        timer: PhaseTimer | None = None) -> TrainResult:
    """Run one training job on Ray Train; resumes from `run_dir`'s last checkpoint when there is one.

    Relative paths in `cfg` are taken from the working directory, here, once; workers get absolute ones.
    Checkpoints go to `distributed.storage_path` (default: `<run_dir>/ray`) under a Ray run name derived
    from `run_dir`, so that calling fit again with the same run directory continues the run.
    `fail_after_epoch` makes the workers raise after checkpointing that epoch, with no restart by Ray: the
    run fails as a crashed driver's would (tests of resume).
    `close_run=False` leaves the MLflow run's status and `pcpp.status` to the caller (a sweep, which
    alone knows whether its scheduler stopped the trial); metrics and artifacts are logged either way.
    `timer` (stages.profile), when given, receives where the time went: the driver's phases, Ray Train's
    start-up and tear-down and rank 0's phases, in order; they are also logged to the MLflow run.
    """
    timer = timer if timer is not None else PhaseTimer()
    timer.mark()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.train_backend import torch_config

    timer.mark("driver: import Ray Train")
    cfg = absolute(cfg)
    run_dir = Path(run_dir) if run_dir else Path(cfg.tracking.run_root) / "train" / f"{cfg.name}-{cfg.digest()}"
    run_dir = run_dir.expanduser().resolve()
    d = cfg.distributed
    check_inputs(cfg)
    check_batches(cfg, d.num_workers)
    check_model(cfg)  # a bad model / teacher / spec fails here, before Ray starts (on the meta device)
    storage, ray_name = storage_root(cfg, run_dir), ray_run_name(cfg, run_dir)
    check_storage_unchanged(run_dir, storage, ray_name)
    stored = stored_state(storage, ray_name)
    layout = (stored["tag"], stored["zero_stage"], stored["world_size"]) if stored else checkpoint_layout(run_dir)
    check_resume(run_dir, deepspeed_config(cfg, d.num_workers), d.num_workers, layout=layout)
    fault = fault_spec()
    if stored is not None:
        print(f"{cfg.name}: resuming after epoch {stored['epoch']} from the checkpoints in {storage}/{ray_name}",
              file=sys.stderr, flush=True)
    timer.mark("driver: checks (inputs, batches, model, resume)")

    ensure_ray()
    check_resources({"GPU": d.num_workers} if d.use_gpu else {"CPU": d.num_workers},
                    f"distributed.num_workers={d.num_workers}" + (" with use_gpu" if d.use_gpu else ""))
    timer.mark("Ray start")
    write_run_config(run_dir, cfg)
    (run_dir / STORAGE_MARK).write_text(storage)
    uri = tracking_uri(cfg.tracking.run_root, cfg.tracking.tracking_uri)
    run_id = start_training_run(cfg, run_dir, uri, parent_run_id, run_name, run_tags) if log_to_mlflow else None
    (run_dir / RESULT).unlink(missing_ok=True)
    (run_dir / PROFILE).unlink(missing_ok=True)
    launch = uuid.uuid4().hex[:12]
    timer.mark("MLflow run start")

    started = time.time()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": cfg.to_dict(), "run_dir": str(run_dir), "run_id": run_id, "tracking_uri": uri,
                           "fail_after_epoch": fail_after_epoch, "launch": launch, "fault": fault},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker=None if d.use_gpu else {"CPU": 1},
                                     placement_strategy=d.placement_strategy),
        torch_config=torch_config(d.use_gpu),
        run_config=RunConfig(name=ray_name, storage_path=storage, callbacks=callbacks or None,
                             failure_config=FailureConfig(max_failures=0 if fail_after_epoch else d.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=d.checkpoints_to_keep)),
    )
    error = None
    try:
        trainer.fit()
    except Exception as e:  # a worker crash: the run is marked failed, checkpoints stay for a resume
        error = e
    add_worker_profile(timer, run_dir / PROFILE, started, time.time())
    result_file = run_dir / RESULT
    if result_file.exists():
        res = json.loads(result_file.read_text())
    else:
        res = {"status": "failed", "message": _failure_message(error), "metrics": {},
               "epochs_done": epochs_done(run_dir)}
    restarted = restarts(run_dir, launch)
    if restarted:
        print(f"{cfg.name}: Ray restarted the workers {restarted} time(s) from the last checkpoint "
              f"(distributed.max_failures={d.max_failures})", file=sys.stderr, flush=True)
    if run_id is not None:
        run = Run(uri, run_id)
        run.set_tags({"pcpp.restarts": str(restarts(run_dir))})
        run.log_files([run_dir / "config.yaml"])
        if (run_dir / "final" / "model.pt").exists():
            run.log_files([run_dir / "final" / "model.pt"], artifact_path="checkpoint")
        run.log_text(json.dumps(timer.seconds, indent=1), "profile.json")
        if close_run:
            run.finish("FINISHED" if res["status"] == "finished" else "FAILED", res["message"],
                       pcpp_status=res["status"])
    timer.mark("driver: MLflow tags, artifacts, finish")
    return TrainResult(res["status"], res["message"], str(run_dir), run_id, res["metrics"], res["epochs_done"],
                       restarted, dict(timer.seconds))


def add_worker_profile(timer: PhaseTimer, path: Path, started: float, ended: float) -> None:
    """Rank 0's phases (its profile.json) into the driver's `timer`, between Ray Train's start-up (the trainer,
    controller, worker group, worker imports, torch.distributed: from `started` until the worker entered its
    function) and tear-down (from when it left until `ended`, when `trainer.fit()` returned)."""
    timer.mark()
    if not path.exists():
        timer.add("Ray Train (no worker profile)", ended - started)
        return
    worker = json.loads(path.read_text())
    timer.add("Ray Train start (controller, workers, torch.distributed)", worker["entered"] - started)
    for name, seconds in worker["phases"].items():
        timer.add(name, seconds)
    timer.add("Ray Train end (workers, controller)", ended - worker["left"])
