"""The one training engine: Ray Train (TorchTrainer, Train V2) workers, each driving a DeepSpeed engine.

Used by binarized pre-training, FT, E2E and the Tune sweeps alike. Per step: schedules move to
progress = step / total steps, the pair (or the rule's latent forward) runs, the rule's hooks wrap the
optimizer step. Per epoch: honest binarized evaluation, metrics to MLflow (rank 0), a DeepSpeed
checkpoint under the run directory; a rerun resumes from the last complete epoch. A non-finite loss or
weight ends the run with status `diverged` and a one-line message instead of a traceback.

The driver (`fit`) checks everything it can before Ray and MLflow start (stages.preflight): inputs,
batches, a resume's ZeRO stage and world size, then the cluster's resources once Ray is up.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.local import check_resources, deepspeed_file, ensure_ray, resolve, tracking_uri
from pcpp import models
from pcpp import nn as pnn
from pcpp.calibration import BalanceReport, prepare_activations_
from pcpp.distill import kd_loss
from pcpp.quantizers import Quantizer, get_rule
from pcpp.surgery import binarize_
from stages.config import TrainConfig, absolute, build
from stages.preflight import CHECKPOINTS, check_batches, check_inputs, check_resume
from stages.tracking import flatten, start_training_run  # noqa: F401  (flatten: public helper of this module)

RESULT = "result.json"
# What every epoch reports (to MLflow, epochs.jsonl and Ray Train / Tune), besides the schedule values
# (w_mu, a_mu, rule_rho, ...) and `epoch`: the metrics a sweep may optimise.
EPOCH_METRICS = ("loss", "lr", "train_forward_acc", "binary_acc", "forward_acc", "forward_binary_gap",
                 "soft_fraction", "flip_ratio", "overflow_rate", "epoch_time_s", "images_per_s")


@dataclass
class TrainResult:
    status: str  # finished | diverged | failed (| stopped, set by a sweep for trials its scheduler stopped)
    message: str
    run_dir: str
    run_id: str | None
    metrics: dict
    epochs_done: int

    @property
    def ok(self) -> bool:
        return self.status == "finished"


# -- model, optimizer, DeepSpeed -------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    """The student: FT starts from the teacher's weights, E2E from random; then binarize_."""
    model = models.create(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    if cfg.pipeline == "ft":
        models.load_checkpoint(model, resolve(cfg.teacher))
    report = binarize_(model, cfg.binarize) if cfg.binarize is not None else None
    if cfg.init:
        models.load_checkpoint(model, resolve(cfg.init))
    rule = get_rule(cfg.algorithm.rule, **cfg.algorithm.params)
    if rule.training_quantizer == "fp":
        pnn.set_latent_forward(model, True)
    return model, rule, report


CALIBRATION_BATCHES = 4  # training batches the activation thresholds are calibrated on (BWA / BWAA)


def prepare_activations(model, cfg: TrainConfig, loader) -> BalanceReport | None:
    """BWA / BWAA, before training: calibrate the activation thresholds, then run the balance guard.

    Thresholds are calibrated at the per-channel median (pcpp.calibration) when fine-tuning from the teacher
    (no binarized init): an E2E run keeps beta = 0, a pre-trained student keeps its own, a resumed run gets
    its trained ones back from the checkpoint afterwards. The guard checks the first batch and refuses
    (activation_guard: error) or reports (warn) a layer whose inputs fall >= 99% on one side. The loader is
    seeded per epoch (set_epoch), so reading a few batches here does not change the training order.
    Returns None for BW and full precision.
    """
    spec = cfg.binarize
    if spec is None or spec.activation is None:
        return None
    batches = list(islice(iter(loader), CALIBRATION_BATCHES))
    calibrate = cfg.pipeline == "ft" and not cfg.init
    return prepare_activations_(model, batches, calibrate=calibrate, strict=spec.activation_guard == "error")


def activation_placement(model) -> str | None:
    """The placement the binarized activations resolved to ('auto' becomes hardtanh or threshold)."""
    for _, layer in pnn.binary_layers(model):
        if layer.act_quantizer is not None:
            return layer.activation_placement
    return None


def build_teacher(cfg: TrainConfig):
    teacher = models.create(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    models.load_checkpoint(teacher, resolve(cfg.teacher))
    return teacher.eval().requires_grad_(False)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
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
    if cfg.optim.lr_schedule == "constant":
        return cfg.optim.lr
    return 0.5 * cfg.optim.lr * (1.0 + math.cos(math.pi * progress))


def _sync_masters(engine) -> None:
    """After editing parameters in place (pq / rpc / ptb), copy them into the optimizer's master copies."""
    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()


# -- metrics ----------------------------------------------------------------------------------------------
def schedule_values(model: torch.nn.Module, rule, progress: float) -> dict:
    """mu / rho / t / k of the first binarized layer's pairs and of the rule, for logging."""
    out = {}
    for _, layer in pnn.binary_layers(model):
        for prefix, q in (("w", layer.weight_quantizer), ("a", layer.act_quantizer)):
            if isinstance(q, Quantizer):
                out.update({f"{prefix}_{k}": v for k, v in q.params.items()})
        break
    out.update({f"rule_{k}": v for k, v in rule.values(progress).items()})
    return out


def evaluate(model, loader, device, honest: bool = True) -> tuple[int, int]:
    """(correct, total) of the honest binarized network (or the training forward with honest=False)."""
    correct = total = 0
    with pnn.evaluation(model, honest), torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    return correct, total


def _all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# -- the per-worker loop ---------------------------------------------------------------------------------
def _record_balance(balance: BalanceReport, placement: str | None, run_dir: Path, client, run_id) -> None:
    """The guard's table beside the run and in MLflow (tag pcpp.activation_placement; a warning tag when the
    guard, set to warn, found one-sided layers)."""
    text = f"activation_placement: {placement}\n{balance}\n"
    (run_dir / "activation_balance.txt").write_text(text)
    if balance.refused:
        print(f"warning: {balance.error()}", flush=True)
    if client is None or not run_id:
        return
    client.set_tag(run_id, "pcpp.activation_placement", str(placement))
    client.log_text(run_id, text, "activation_balance.txt")
    client.log_metric(run_id, "act_below_min", min(r.below for r in balance.rows), step=0)
    client.log_metric(run_id, "act_below_max", max(r.below for r in balance.rows), step=0)
    if balance.refused:
        client.set_tag(run_id, "pcpp.activation_guard", f"warn: {len(balance.refused)} one-sided layers: "
                       + ", ".join(r.name for r in balance.refused)[:4000])


def train_worker(config: dict) -> None:
    """Ray Train entry point; `config` = {"train": TrainConfig dict, "run_dir", "run_id", "tracking_uri"}."""
    import deepspeed
    import ray.train

    from stages.data import make_loader

    cfg = build(TrainConfig, config["train"])
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(world, 1)))

    micro = cfg.data.batch_size // world
    norm = models.normalization(cfg.model.name)  # the model's (teacher's) input statistics
    per_rank = None if cfg.data.epoch_length is None else cfg.data.epoch_length // world
    train_loader = make_loader(resolve(cfg.data.train), train=True, batch_size=micro, seed=cfg.seed, rank=rank,
                               world_size=world, num_workers=cfg.data.num_workers, epoch_length=per_rank,
                               mean=norm.mean, std=norm.std)
    eval_per_rank = None if cfg.data.eval_limit is None else cfg.data.eval_limit // world
    test_loader = make_loader(resolve(cfg.data.test), train=False, batch_size=256, seed=cfg.seed, rank=rank,
                              world_size=world, num_workers=cfg.data.num_workers, epoch_length=eval_per_rank,
                              mean=norm.mean, std=norm.std)
    model, rule, _ = build_model(cfg)
    balance = prepare_activations(model, cfg, train_loader)
    teacher = build_teacher(cfg) if cfg.distill.enabled else None
    optimizer = make_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world), dist_init_required=False)
    device = engine.device
    if teacher is not None:
        teacher.to(device)
    binarized = pnn.binarized_params(engine.module)
    scale_of = pnn.scale_of(engine.module)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.optim.epochs

    ckpt_dir = run_dir / CHECKPOINTS
    start_epoch, step = 0, 0
    if (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start_epoch, step = client["epoch"], client["step"]

    client = None
    if rank == 0 and config.get("run_id"):
        from mlflow import MlflowClient

        client = MlflowClient(config["tracking_uri"])
    if rank == 0 and balance is not None:
        _record_balance(balance, activation_placement(engine.module), run_dir, client, config.get("run_id"))

    status, message = "finished", ""
    history = run_dir / "epochs.jsonl"
    # A rerun of a finished (or interrupted) run reports the metrics of its last completed epoch.
    metrics = json.loads(history.read_text().splitlines()[-1]) if history.exists() and start_epoch else {}
    metrics.pop("epoch", None)
    progress = min(step / max(total_steps - 1, 1), 1.0)
    for epoch in range(start_epoch, cfg.optim.epochs):
        train_loader.set_epoch(epoch)
        signs_before = pnn.binary_signs(engine.module)
        for _, m in pnn.binary_layers(engine.module):
            m.reset_overflow()
        t0 = time.time()
        loss_sum = correct = seen = 0.0
        diverged = False
        for x, y in train_loader:
            progress = min(step / max(total_steps - 1, 1), 1.0)  # the last step runs at the schedules' end
            pnn.set_progress(engine.module, progress)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(cfg, progress)
            x, y = x.to(device), y.to(device)
            logits = engine(x)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(logits, t_logits, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
                               targets=y if cfg.distill.alpha < 1 else None)
            else:
                loss = F.cross_entropy(logits, y)
            bad = _all_sum([0.0 if torch.isfinite(loss) else 1.0], device)[0]
            if bad:
                diverged = True
                message = f"diverged: non-finite loss at epoch {epoch + 1}, step {step} (lr {lr_at(cfg, progress):.3g})"
                break
            engine.backward(loss)
            if rule.name == "rpc":
                rule.before_step(binarized, progress, scale_of)
                _sync_masters(engine)
            engine.step()
            if rule.name == "pq":
                rule.after_step(binarized, progress, scale_of)
                _sync_masters(engine)
            step += 1
            loss_sum += float(loss.detach()) * y.numel()
            correct += float((logits.detach().argmax(1) == y).sum())
            seen += y.numel()
        if not diverged and not all(torch.isfinite(p).all() for p in engine.module.parameters()):
            diverged, message = True, f"diverged: non-finite weights after epoch {epoch + 1}"
        if diverged:
            status = "diverged"
            break
        if epoch == cfg.optim.epochs - 1:  # ptb binarizes here, rpc applies its final map
            rule.finalize(binarized, scale_of)
            _sync_masters(engine)
        elapsed = time.time() - t0
        loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], device)
        b_correct, b_total = evaluate(engine.module, test_loader, device, honest=True)
        f_correct, f_total = evaluate(engine.module, test_loader, device, honest=False)
        b_correct, b_total, f_correct, f_total = _all_sum([b_correct, b_total, f_correct, f_total], device)
        signs_after = pnn.binary_signs(engine.module)
        metrics = {
            "loss": loss_sum / max(seen, 1),
            "lr": lr_at(cfg, progress),
            "train_forward_acc": correct / max(seen, 1),
            "binary_acc": b_correct / max(b_total, 1),
            "forward_acc": f_correct / max(f_total, 1),
            "soft_fraction": pnn.soft_fraction(engine.module),
            "flip_ratio": pnn.flip_ratio(signs_before, signs_after),
            "overflow_rate": pnn.mean_overflow_rate(engine.module),
            "epoch_time_s": elapsed,
            "images_per_s": seen / max(elapsed, 1e-9),
            **schedule_values(engine.module, rule, progress),
        }
        metrics["forward_binary_gap"] = metrics["forward_acc"] - metrics["binary_acc"]
        engine.save_checkpoint(str(ckpt_dir), tag=f"epoch-{epoch + 1:04d}",
                               client_state={"epoch": epoch + 1, "step": step})
        if rank == 0:
            if client is not None:
                for k, v in metrics.items():
                    client.log_metric(config["run_id"], k, float(v), step=epoch + 1)
            with history.open("a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **metrics}) + "\n")
        ray.train.report({"epoch": epoch + 1, **metrics})
        if config.get("fail_after_epoch") == epoch + 1:  # fault injection for the resume tests
            raise RuntimeError(f"injected failure after epoch {epoch + 1}")

    if rank == 0:
        final = run_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        if status == "finished":
            torch.save(engine.module.state_dict(), final / "model.pt")
        (run_dir / RESULT).write_text(json.dumps({"status": status, "message": message, "metrics": metrics,
                                                  "epochs_done": _epochs_done(run_dir)}))
    if status == "diverged":  # every metric (NaN), so that a Tune scheduler watching one of them accepts it
        ray.train.report({"epoch": _epochs_done(run_dir) + 1, **{k: math.nan for k in EPOCH_METRICS},
                          "diverged": 1.0})


# -- the driver ----------------------------------------------------------------------------------------
def _failure_message(error: BaseException | None) -> str:
    """One line: the error type and the innermost cause (Ray wraps worker errors in several layers)."""
    if error is None:
        return "failed: the workers ended without writing a result"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1] if lines else "")
    return f"failed: {type(error).__name__}: {cause}"


def _epochs_done(run_dir: Path) -> int:
    f = run_dir / "epochs.jsonl"
    return sum(1 for _ in f.open()) if f.exists() else 0


def fit(cfg: TrainConfig, *, run_dir: str | Path | None = None, parent_run_id: str | None = None,
        run_name: str | None = None, log_to_mlflow: bool = True, fail_after_epoch: int | None = None,
        callbacks: list | None = None, run_tags: dict | None = None, close_run: bool = True) -> TrainResult:
    """Run one training job on Ray Train; resumes from `run_dir`'s last checkpoint when there is one.

    Relative paths in `cfg` are taken from the working directory, here, once; workers get absolute ones.
    `fail_after_epoch` makes the workers raise after checkpointing that epoch (tests of resume).
    `close_run=False` leaves the MLflow run's status and `pcpp.status` to the caller (a sweep, which
    alone knows whether its scheduler stopped the trial); metrics and artifacts are logged either way.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.train_backend import torch_config

    cfg = absolute(cfg)
    run_dir = Path(run_dir) if run_dir else Path(cfg.tracking.run_root) / "train" / f"{cfg.name}-{cfg.digest()}"
    run_dir = run_dir.expanduser().resolve()
    d = cfg.distributed
    check_inputs(cfg)
    check_batches(cfg, d.num_workers)
    build_model(cfg)  # a bad model / teacher / spec fails here, before Ray starts
    check_resume(run_dir, deepspeed_config(cfg, d.num_workers), d.num_workers)

    ensure_ray()
    check_resources({"GPU": d.num_workers} if d.use_gpu else {"CPU": d.num_workers},
                    f"distributed.num_workers={d.num_workers}" + (" with use_gpu" if d.use_gpu else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    uri = tracking_uri(cfg.tracking.run_root, cfg.tracking.tracking_uri)
    run_id = start_training_run(cfg, run_dir, uri, parent_run_id, run_name, run_tags) if log_to_mlflow else None
    (run_dir / RESULT).unlink(missing_ok=True)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": cfg.to_dict(), "run_dir": str(run_dir), "run_id": run_id, "tracking_uri": uri,
                           "fail_after_epoch": fail_after_epoch},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker=None if d.use_gpu else {"CPU": 1}),
        torch_config=torch_config(d.use_gpu),
        run_config=RunConfig(name=f"{cfg.name}-{cfg.digest()}", storage_path=str(run_dir / "ray"),
                             callbacks=callbacks or None),
    )
    error = None
    try:
        trainer.fit()
    except Exception as e:  # a worker crash: the run is marked failed, checkpoints stay for a resume
        error = e
    result_file = run_dir / RESULT
    if result_file.exists():
        res = json.loads(result_file.read_text())
    else:
        res = {"status": "failed", "message": _failure_message(error), "metrics": {},
               "epochs_done": _epochs_done(run_dir)}
    if run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        client.log_artifact(run_id, str(run_dir / "config.yaml"))
        if (run_dir / "final" / "model.pt").exists():
            client.log_artifact(run_id, str(run_dir / "final" / "model.pt"), artifact_path="checkpoint")
        if close_run:
            client.set_tag(run_id, "pcpp.status", res["status"])
            if res["message"]:
                client.set_tag(run_id, "pcpp.message", res["message"][:5000])
            client.set_terminated(run_id, status="FINISHED" if res["status"] == "finished" else "FAILED")
    return TrainResult(res["status"], res["message"], str(run_dir), run_id, res["metrics"], res["epochs_done"])
