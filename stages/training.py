"""One worker's share of a training run, in the shape of a torchtune recipe: setup, train_epoch, evaluate,
save_checkpoint, cleanup (`TrainingRun`; `TrainingRun.run` drives them).

Used by binarized pre-training, FT, E2E and the Tune sweeps alike, inside a Ray Train worker
(stages.engine.train_worker) or, for tests, in any process with torch.distributed initialised.
Per step: the schedules move to progress = step / (total steps - 1) (pcpp.schedules.progress_at), the
learning rate follows pcpp.schedules.learning_rate, the update rule's hooks run around DeepSpeed's step
through their interface (pcpp.rules.RuleOptimizer: before_step / after_step, then finalize once), never by
the rule's name. Per epoch: the BatchNorm statistics re-estimated under the honest forward
(`TrainingRun.recalibrate_bn`), honest binarized evaluation (pcpp.evaluation), a DeepSpeed checkpoint (every
rank its shard), metrics to MLflow and epochs.jsonl (rank 0, stages.tracking, each epoch once across
restarts), then the checkpoint committed through `report` (Ray Train persists it in the run's storage,
stages.storage). A non-finite loss or weight ends the run with status `diverged` and a one-line message; the
activation guard's refusal (stages.activations) ends it before training with status `refused`, and its message.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.local import deepspeed_file, resolve, usable_cpus
from cluster.progress import bar as progress_bar
from pcpp import layers, models
from pcpp.calibration import recalibrate_batchnorm_, thresholds_set_next
from pcpp.distill import kd_loss
from pcpp.evaluation import as_input, evaluate, model_dtype
from pcpp.quantizers import Quantizer
from pcpp.rules import RuleOptimizer, UpdateRule, get_rule
from pcpp.schedules import learning_rate, progress_at
from stages.activations import activation_placement, prepare_activations, record_balance, refusal
from stages.config import TrainConfig
from stages.preflight import CHECKPOINTS
from stages.storage import STATE, Fault, record_start
from stages.tracking import Run

RESULT = "result.json"
HISTORY = "epochs.jsonl"
# What every epoch reports (to MLflow, epochs.jsonl and Ray Train / Tune), besides the schedule values
# (w_mu, a_mu, rule_rho, ...) and `epoch`: the metrics a sweep may optimise.
EPOCH_METRICS = ("loss", "lr", "train_forward_acc", "binary_acc", "forward_acc", "forward_binary_gap",
                 "soft_fraction", "flip_ratio", "overflow_rate", "epoch_time_s", "images_per_s")
EVAL_BATCH = 256


# -- what a run starts from ------------------------------------------------------------------------------
def from_teacher(cfg: TrainConfig) -> bool:
    """Fine-tuning: the student starts from the teacher's full-precision weights (else random init)."""
    return cfg.init == "teacher"


def student_checkpoint(cfg: TrainConfig) -> str | None:
    """A binarized student's checkpoint to start from (after binarized pre-training), if any."""
    return cfg.student


def model_recipe(cfg: TrainConfig) -> dict:
    """How to build the architecture (pcpp.models.load): {"name", "kwargs" with num_classes}."""
    return {"name": cfg.model.name, "kwargs": {**cfg.model.kwargs, "num_classes": cfg.model.num_classes}}


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, UpdateRule]:
    """The student and its update rule: teacher weights (FT) or random, binarized, then the student's own
    checkpoint if one is given; the forward sees w* itself when the rule trains it (`training_quantizer`)."""
    student = student_checkpoint(cfg)
    with thresholds_set_next():  # the worker calibrates them next (stages.activations), or the student has them
        model = models.load(model_recipe(cfg), cfg.binarize, weights=resolve(student) if student else None,
                            pretrained=resolve(cfg.teacher) if from_teacher(cfg) else None)
    rule = get_rule(cfg.algorithm.rule, **cfg.algorithm.params)
    if rule.training_quantizer == "fp":
        layers.set_latent_forward(model, True)
    return model, rule


def build_teacher(cfg: TrainConfig) -> torch.nn.Module:
    """The full-precision teacher for distillation, frozen, in eval mode."""
    return models.load(model_recipe(cfg), weights=resolve(cfg.teacher)).eval().requires_grad_(False)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of the run: the preset or file, with the batch split over `world_size` workers.

    Raises FileNotFoundError for a missing file, ValueError when the batch does not split evenly."""
    path = deepspeed_file(cfg.distributed.deepspeed)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (distributed.deepspeed)")
    ds = json.loads(path.read_text())
    ds.pop("comment", None)
    if cfg.data.batch_size % world_size:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {world_size} workers")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size // world_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.data.batch_size
    if cfg.distributed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.distributed.zero_stage
    return ds


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_at(cfg: TrainConfig, progress: float) -> float:
    return learning_rate(cfg.optim.lr, progress, cfg.optim.lr_schedule)


def sync_masters(engine) -> None:
    """After a rule edited the parameters in place, copy them into DeepSpeed's fp32 master partitions."""
    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()


def schedule_values(model: torch.nn.Module, rule: UpdateRule, progress: float) -> dict:
    """mu / rho / t / k of the first binarized layer's pairs and of the rule, for logging."""
    out = {}
    for _, layer in layers.binary_layers(model):
        for prefix, q in (("w", layer.weight_quantizer), ("a", layer.act_quantizer)):
            if isinstance(q, Quantizer):
                out.update({f"{prefix}_{k}": v for k, v in q.params.items()})
        break
    out.update({f"rule_{k}": v for k, v in rule.values(progress).items()})
    return out


def all_sum(values: list[float], device) -> list[float]:
    """The sums over all ranks (the values themselves without torch.distributed)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def epochs_done(run_dir: Path) -> int:
    f = Path(run_dir) / HISTORY
    return sum(1 for _ in f.open()) if f.exists() else 0


@dataclass
class EpochStats:
    """What one pass over the training data measured on this rank (summed over ranks by train_epoch)."""

    loss_sum: float
    correct: float
    seen: float
    elapsed: float


# -- the recipe ----------------------------------------------------------------------------------------------
class TrainingRun:
    """One worker (rank `rank` of `world_size`) of a training run whose files live in `run_dir`.

    `report(metrics, checkpoint_dir)` receives each epoch's metrics and this rank's checkpoint directory
    (in a Ray Train worker: `ray.train.report` with a Checkpoint, the commit point of the epoch; the
    directory may be removed once it returns), and the metrics of a diverged run without a directory.
    `resume_from` is the checkpoint to resume from (`ray.train.get_checkpoint()`: anything with
    `as_directory()`, or a local directory); `persist=True` saves each epoch's checkpoint into a temporary
    directory for `report` to persist, `persist=False` (no Ray) into `run_dir/checkpoints`, which is then also
    what a rerun resumes from. `run`, when given, is the MLflow run rank 0 logs to (stages.tracking.Run).
    `fault` is the test hook of stages.storage; `launch` and `node` go into starts.jsonl (restart counts).
    torch.distributed must be initialised (Ray Train does it in its workers). `mark(phase)`: stages.profile.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 run: Run | None = None, report: Callable[..., None] | None = None, resume_from=None,
                 persist: bool = False, fault: dict | None = None, launch: str | None = None,
                 node: str | None = None, mark: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world = rank, world_size
        self.tracker = run if rank == 0 else None
        self.report = report or (lambda metrics, checkpoint_dir=None: None)
        self.resume_from, self.persist = resume_from, persist
        self.fault = Fault(fault, rank, node)
        self.launch, self.node, self.mark = launch, node, mark or (lambda phase: None)
        self.status, self.message = "finished", ""
        self.metrics: dict = {}
        self.history: list[dict] = []  # {"epoch", **metrics} of every completed epoch, saved with checkpoints
        self.in_mlflow: set[int] = set()  # epochs the MLflow run has (rank 0): never logged twice
        self.start_epoch = self.step = 0
        self.progress = 0.0

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Loaders, model, activation calibration, teacher, optimizer, DeepSpeed, rule hooks, resume."""
        import deepspeed

        from stages.data import LoaderConfig, make_loader

        cfg, rank, world = self.cfg, self.rank, self.world
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(max(1, usable_cpus() // max(world, 1)))
        norm = models.normalization(cfg.model.name)  # the model's (teacher's) input statistics
        per_rank = None if cfg.data.epoch_length is None else cfg.data.epoch_length // world
        batches = LoaderConfig(batch_size=cfg.data.batch_size // world, num_workers=cfg.data.num_workers,
                               mean=norm.mean, std=norm.std)
        self.train_loader = make_loader(resolve(cfg.data.train), batches, train=True, seed=cfg.seed, rank=rank,
                                        world_size=world, epoch_length=per_rank)
        eval_per_rank = None if cfg.data.eval_limit is None else cfg.data.eval_limit // world
        self.test_loader = make_loader(resolve(cfg.data.test), batches, train=False, batch_size=EVAL_BATCH,
                                       seed=cfg.seed, rank=rank, world_size=world, epoch_length=eval_per_rank)
        model, rule = build_model(cfg)
        self.mark("model build")
        balance = prepare_activations(model, cfg, self.train_loader)
        refused = refusal(balance, cfg)
        if refused:  # the guard refused (on some rank): its table is kept, nothing trains, Ray does not retry
            self.status, self.message = "refused", refused[0]
            if rank == 0:
                record_balance(refused[1], activation_placement(model), self.run_dir, self.tracker, refused=True)
            return
        self.teacher = build_teacher(cfg) if cfg.distill.enabled else None
        optimizer = make_optimizer(cfg, model)
        # DeepSpeed gets the plain optimizer: under ZeRO it steps flat fp32 partitions, not the layers' tensors,
        # so the rule's hooks run around its step on the model's parameters (then sync its master copies).
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg, world), dist_init_required=False)
        self.mark("calibration, DeepSpeed init")
        self.module = self.engine.module
        self.device, self.dtype = self.engine.device, model_dtype(self.module)
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.rules = RuleOptimizer(optimizer, rule, layers.binarized_params(self.module),
                                   layers.scale_of(self.module), sync=lambda: sync_masters(self.engine))
        self.total_steps = len(self.train_loader) * cfg.optim.epochs
        self.restore()
        record_start(self.run_dir, self.launch, rank, self.node, self.start_epoch)
        if balance is not None and rank == 0:
            record_balance(balance, activation_placement(self.module), self.run_dir, self.tracker)
        # A rerun of a finished (or interrupted) run reports the metrics of its last completed epoch.
        if self.history:
            self.metrics = {k: v for k, v in self.history[-1].items() if k != "epoch"}
        self.progress = progress_at(self.step, self.total_steps)

    def restore(self) -> None:
        """Load the checkpoint to resume from (`resume_from`, else the run directory's own), if any; rank 0
        then makes epochs.jsonl hold exactly the checkpoint's epochs, logs to MLflow a committed epoch it
        lacks, and notes the epochs MLflow has: an epoch logged by workers that died before Ray committed
        it is redone but not logged again (from an epoch boundary the run is deterministic: the same
        metrics but for their timing)."""
        if self.resume_from is not None:
            where = self.resume_from.as_directory() if hasattr(self.resume_from, "as_directory") \
                else contextlib.nullcontext(self.resume_from)
        elif (self.checkpoints / "latest").exists():
            where = contextlib.nullcontext(self.run_dir)
        else:
            where = None
        logged = [json.loads(x) for x in (self.run_dir / HISTORY).read_text().splitlines()] \
            if (self.run_dir / HISTORY).exists() else []
        if where is not None:
            with where as directory:
                ckpt = Path(directory) / CHECKPOINTS
                _, state = self.engine.load_checkpoint(str(ckpt))
                saved = ckpt / STATE
                # a checkpoint of an earlier release has no history: its epochs are those logged
                self.history = json.loads(saved.read_text())["history"] if saved.exists() else None
            self.start_epoch, self.step = state["epoch"], state["step"]
            self.history = logged[: self.start_epoch] if self.history is None else self.history
        if self.rank != 0:
            return
        if self.tracker is not None:  # the epochs MLflow already has (logged by workers that died since)
            self.in_mlflow = {m.step for m in self.tracker.client.get_metric_history(self.tracker.run_id, "loss")}
            for h in self.history:
                if h["epoch"] not in self.in_mlflow:  # committed, but its workers died before logging it
                    self.tracker.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
                    self.in_mlflow.add(h["epoch"])
        if [h["epoch"] for h in logged] != [h["epoch"] for h in self.history]:
            tmp = self.run_dir / (HISTORY + ".tmp")  # other ranks may be reading it: replaced atomically
            tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
            os.replace(tmp, self.run_dir / HISTORY)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS

    # -- one epoch ---------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or the distillation loss against the teacher's logits (pcpp.distill), in fp32 (the
        logits of a half-precision model too)."""
        logits = logits.float()
        if self.teacher is None:
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            t_logits = self.teacher(as_input(x, model_dtype(self.teacher)))
        d = self.cfg.distill
        return kd_loss(logits, t_logits, temperature=d.temperature, alpha=d.alpha, targets=y if d.alpha < 1 else None)

    def train_epoch(self, epoch: int) -> EpochStats | None:
        """One pass over the training data; None (status diverged, with a message) on a non-finite loss."""
        self.train_loader.set_epoch(epoch)
        for _, m in layers.binary_layers(self.module):
            m.reset_overflow()
        t0 = time.time()
        loss_sum = correct = seen = 0.0
        bar = progress_bar(desc=f"{self.cfg.name} epoch {epoch + 1}/{self.cfg.optim.epochs}", unit="step",
                           total=len(self.train_loader), disable=self.rank != 0)  # one live bar (cluster.progress)
        for i, (x, y) in enumerate(self.train_loader):
            self.fault.at(epoch, i)
            self.progress = progress_at(self.step, self.total_steps)  # the last step runs at the schedules' end
            layers.set_progress(self.module, self.progress)
            self.rules.set_progress(self.progress)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr_at(self.cfg, self.progress)
            x, y = x.to(self.device), y.to(self.device)
            # fp16 / bf16 under DeepSpeed: the engine holds a half-precision model, whose inputs must be half too
            logits = self.engine(as_input(x, self.dtype))
            loss = self.loss(logits, x, y)
            if all_sum([0.0 if torch.isfinite(loss) else 1.0], self.device)[0]:
                self.status = "diverged"
                self.message = (f"diverged: non-finite loss at epoch {epoch + 1}, step {self.step} "
                                f"(lr {lr_at(self.cfg, self.progress):.3g})")
                bar.close()
                return None
            self.engine.backward(loss)
            self.rules.before_step()
            self.engine.step()
            self.rules.after_step()
            self.step += 1
            loss_sum += float(loss.detach()) * y.numel()
            correct += float((logits.detach().argmax(1) == y).sum())
            seen += y.numel()
            bar.update(1)
        bar.close()
        return EpochStats(loss_sum, correct, seen, time.time() - t0)

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """forward_acc (the training forward, with the BatchNorm statistics training left) and binary_acc (the
        honest binarized network, pcpp.evaluation, after `recalibrate_bn`) on the test loader, summed over
        ranks. The re-estimated statistics stay in the model: its checkpoint and export are that network."""
        f_correct, f_total = evaluate(self.module, self.test_loader, self.device, honest=False)
        self.recalibrate_bn()
        b_correct, b_total = evaluate(self.module, self.test_loader, self.device, honest=True)
        b_correct, b_total, f_correct, f_total = all_sum([b_correct, b_total, f_correct, f_total], self.device)
        return {"binary_acc": b_correct / max(b_total, 1), "forward_acc": f_correct / max(f_total, 1)}

    def recalibrate_bn(self) -> int:
        """Re-estimate the BatchNorm statistics under the honest forward on the first
        `algorithm.bn_recalibration_batches` training batches of the epoch (each rank its own, then averaged
        over ranks; pcpp.calibration.recalibrate_batchnorm_). Full-precision runs are left alone. Returns the
        number of BatchNorms re-estimated."""
        n = min(self.cfg.algorithm.bn_recalibration_batches, len(self.train_loader))
        if n == 0 or self.cfg.binarize is None:
            return 0

        def average(t: torch.Tensor) -> None:
            torch.distributed.all_reduce(t)
            t.div_(self.world)

        with contextlib.closing(iter(self.train_loader)) as batches:  # its workers end even on an error
            return recalibrate_batchnorm_(self.module, islice(batches, n), device=self.device,
                                          reduce=average if self.world > 1 else None)

    def epoch_metrics(self, stats: EpochStats, signs_before: dict) -> dict:
        loss_sum, correct, seen = all_sum([stats.loss_sum, stats.correct, stats.seen], self.device)
        scores = self.evaluate()
        m = self.module
        metrics = {
            "loss": loss_sum / max(seen, 1),
            "lr": lr_at(self.cfg, self.progress),
            "train_forward_acc": correct / max(seen, 1),
            **scores,
            "soft_fraction": layers.soft_fraction(m),
            "flip_ratio": layers.flip_ratio(signs_before, layers.binary_signs(m)),
            "overflow_rate": layers.mean_overflow_rate(m),
            "epoch_time_s": stats.elapsed,
            "images_per_s": seen / max(stats.elapsed, 1e-9),
            **schedule_values(m, self.rules.rule, self.progress),
        }
        metrics["forward_binary_gap"] = metrics["forward_acc"] - metrics["binary_acc"]
        return metrics

    # -- checkpoints and logs ----------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> Path:
        """The checkpoint of a completed epoch: DeepSpeed's (every rank its shard) under `<dir>/checkpoints`,
        with pcpp_checkpoint.json (rank 0); `<dir>` is a new temporary directory with `persist`, else the run
        directory. Returns `<dir>`, resumable by `setup`."""
        target = Path(tempfile.mkdtemp(prefix=f"pcpp-ckpt-{self.rank}-")) if self.persist else self.run_dir
        self.engine.save_checkpoint(str(target / CHECKPOINTS), tag=f"epoch-{epoch + 1:04d}",
                                    client_state={"epoch": epoch + 1, "step": self.step})
        if self.rank == 0:
            (target / CHECKPOINTS / STATE).write_text(json.dumps({
                "epoch": epoch + 1, "step": self.step, "tag": f"epoch-{epoch + 1:04d}",
                "zero_stage": int(self.engine.zero_optimization_stage()), "world_size": self.world,
                "history": self.history}))
        return target

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        if self.rank == 0:
            if self.tracker is not None and epoch + 1 not in self.in_mlflow:
                self.tracker.log_epoch(metrics, epoch + 1)  # with the kernel path (stages.tracking)
                self.in_mlflow.add(epoch + 1)
            with (self.run_dir / HISTORY).open("a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **metrics}) + "\n")
            g = {k: metrics.get(k, math.nan) for k in ("loss", "binary_acc", "forward_acc", "epoch_time_s")}
            print(f"{self.cfg.name} epoch {epoch + 1}/{self.cfg.optim.epochs}: loss {g['loss']:.4f}, binary acc "
                  f"{g['binary_acc']:.4f}, forward acc {g['forward_acc']:.4f}, {g['epoch_time_s']:.1f} s", flush=True)

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.module.parameters())

    # -- the loop and the end ----------------------------------------------------------------------------
    def train(self, fail_after_epoch: int | None = None) -> None:
        """The epochs left; `fail_after_epoch` raises after checkpointing that epoch (tests of resume)."""
        epochs = self.cfg.optim.epochs
        for epoch in range(self.start_epoch, epochs):
            signs_before = layers.binary_signs(self.module)
            stats = self.train_epoch(epoch)
            if stats is not None and not self.weights_finite():
                self.status, self.message = "diverged", f"diverged: non-finite weights after epoch {epoch + 1}"
            if self.status == "diverged":
                return
            if epoch == epochs - 1:  # ptb binarizes here, rpc applies its final map
                self.rules.finalize()
            self.metrics = self.epoch_metrics(stats, signs_before)
            self.history.append({"epoch": epoch + 1, **self.metrics})
            saved = self.save_checkpoint(epoch)
            # Logged before the report: a Tune scheduler may end the trial as soon as it sees the report.
            self.log_epoch(epoch, self.metrics)
            try:
                self.report({"epoch": epoch + 1, **self.metrics}, saved)  # the commit point of the epoch
            finally:  # Ray has copied it to the storage path (or failed): the local copy goes either way
                if self.persist:
                    shutil.rmtree(saved, ignore_errors=True)
            if fail_after_epoch == epoch + 1:
                raise RuntimeError(f"injected failure after epoch {epoch + 1}")

    def cleanup(self) -> None:
        """Rank 0 writes the final weights (when finished) and result.json; a diverged or refused run reports
        every epoch metric as NaN, so that a Tune scheduler watching one of them accepts it."""
        if self.rank == 0:
            if self.status == "finished":
                final = self.run_dir / "final"
                final.mkdir(parents=True, exist_ok=True)
                torch.save(self.module.state_dict(), final / "model.pt")
            (self.run_dir / RESULT).write_text(json.dumps({
                "status": self.status, "message": self.message, "metrics": self.metrics,
                "epochs_done": epochs_done(self.run_dir)}))
        if self.status in ("diverged", "refused"):
            self.report({"epoch": epochs_done(self.run_dir) + 1, **{k: math.nan for k in EPOCH_METRICS},
                         self.status: 1.0})

    def run(self, fail_after_epoch: int | None = None) -> str:
        """setup, train, cleanup; returns the status (finished, diverged, or refused by the activation guard)."""
        self.setup()
        if self.status != "refused":
            self.train(fail_after_epoch)
        self.cleanup()
        return self.status
