"""Checks a training run passes on the driver before Ray workers or an MLflow run start.

Each failure is one line naming the value and what would work: missing inputs, a model, teacher, student or
binarize spec that do not fit together (the student built on the meta device: `check_model`), an epoch without
a single batch, a batch that does not split over the workers, and a resume from a DeepSpeed checkpoint
written with another ZeRO stage or world size (DeepSpeed would fail deep inside `load_checkpoint`), found
in the run's Ray storage (stages.storage) or, for runs of earlier releases, in `<run dir>/checkpoints`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from cluster.local import deepspeed_file

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"


def _manifest(cfg, split: str) -> dict:
    path = getattr(cfg.data, split)
    if not path or not (Path(path) / MANIFEST).exists():
        raise FileNotFoundError(f"data.{split} = {path!r} is not a shard directory with a {MANIFEST} "
                                f"(make one with `pcpp prepare SRC OUT`)")
    return json.loads((Path(path) / MANIFEST).read_text())


def check_inputs(cfg) -> None:
    """The checkpoints the run needs are named (TrainConfig.validate_inputs), and the shards, checkpoints
    and DeepSpeed file the config names exist."""
    cfg.validate_inputs()
    for split in ("train", "test"):
        _manifest(cfg, split)
    for key in ("teacher", "student"):
        path = getattr(cfg, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key}: checkpoint {path} does not exist")
    ds = deepspeed_file(cfg.distributed.deepspeed)
    if not ds.exists():
        raise FileNotFoundError(f"distributed.deepspeed: {ds} does not exist (a preset: cpu, v100; or a JSON file)")


# In-place random initialisers: skipped on the meta device (see `meta_model`).
RANDOM_INITS = frozenset({"normal_", "uniform_", "erfinv_", "exponential_", "geometric_", "log_normal_", "cauchy_",
                          "random_", "bernoulli_"})


def meta_model(cfg):
    """(student, rule) exactly as a worker builds them (stages.training.build_model: architecture, teacher weights,
    binarize_, the student's checkpoint, the rule), but on the meta device: shapes and names without storage.

    A bad model name or arguments, a teacher or student checkpoint that does not fit (shapes, key sets), a spec
    pattern that matches nothing raise the same ValueError as the real build. Weight initialisers are skipped:
    they compute nothing on meta tensors, and some of their meta kernels import torch._dynamo (1-2 s). A
    ViT-B/16 takes 0.1 s instead of 6.8 s; ResNet-20 0.03 s instead of 0.15 s. The checkpoints are still read.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    from stages.training import build_model  # stages.training imports this module

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in RANDOM_INITS:
                return args[0] if args else kwargs["tensor"]
            return func(*args, **kwargs)

    with warnings.catch_warnings():  # loading weights into meta parameters is a no-op, and torch says so per tensor
        warnings.filterwarnings("ignore", message=".*meta parameter.*", category=UserWarning)
        with torch.device("meta"), SkipInit():
            return build_model(cfg)


def check_model(cfg) -> None:
    """The student builds (`meta_model`): a model, teacher, student checkpoint, spec or rule that do not fit
    together is refused on the driver, before Ray starts, with the worker's own error."""
    meta_model(cfg)


def check_batches(cfg, world: int) -> None:
    """Every rank trains on at least one full batch per epoch and evaluates on at least one sample.

    The training loader drops the last partial batch (every rank takes the same number of equal steps),
    so an epoch shorter than one batch would train on nothing: refused here, naming both sizes.
    """
    d = cfg.data
    if d.batch_size % world:
        raise ValueError(f"data.batch_size {d.batch_size} does not split over {world} workers "
                         f"(distributed.num_workers): use a multiple of {world}")
    train, test = _manifest(cfg, "train"), _manifest(cfg, "test")
    for split, m in (("train", train), ("test", test)):
        if len(m["shards"]) < world:
            raise ValueError(f"data.{split} has {len(m['shards'])} shard(s) for {world} workers: prepare it with a "
                             f"smaller shard size (at least one shard per worker)")
    samples = d.epoch_length or train["num_samples"]
    where = f"data.epoch_length {d.epoch_length}" if d.epoch_length else f"data.train's {samples} samples"
    if samples // world < d.batch_size // world:
        raise ValueError(f"an epoch would train on no batch: {where} is fewer than one batch of data.batch_size "
                         f"{d.batch_size} (the last partial batch is dropped): use data.batch_size <= "
                         f"{samples - samples % world} or more samples")
    if d.eval_limit is not None and d.eval_limit < world:
        raise ValueError(f"data.eval_limit {d.eval_limit} leaves some of the {world} workers without a test sample")


def zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def checkpoint_layout(run_dir: Path) -> tuple[str, int, int] | None:
    """(tag, ZeRO stage, data-parallel world size) of the run directory's latest DeepSpeed checkpoint."""
    import torch

    ckpt = Path(run_dir) / CHECKPOINTS
    if not (ckpt / "latest").exists():
        return None
    tag = (ckpt / "latest").read_text().strip()
    states = ckpt / tag / "mp_rank_00_model_states.pt"
    if not states.exists():
        return None
    # DeepSpeed's own record of how it wrote the checkpoint (its config and world size); mmap: no weights read.
    state = torch.load(states, map_location="cpu", weights_only=False, mmap=True)
    return tag, zero_stage(state.get("ds_config") or {}), int(state.get("dp_world_size", 1))


def check_resume(run_dir: Path, ds_config: dict, world: int, layout: tuple[str, int, int] | None = None) -> None:
    """A rerun resumes only a checkpoint of the same ZeRO stage and world size (DeepSpeed shards by both).

    `layout` is (tag, ZeRO stage, world size) of the run's latest checkpoint when the caller found it (in Ray's
    storage: stages.storage.stored_state); default: the run directory's own DeepSpeed checkpoint."""
    layout = layout or checkpoint_layout(run_dir)
    if layout is None:
        return
    tag, stage0, world0 = layout
    stage = zero_stage(ds_config)
    if (stage0, world0) != (stage, world):
        raise ValueError(f"run dir {run_dir} holds a DeepSpeed checkpoint ({tag}) written with ZeRO stage {stage0} "
                         f"on {world0} worker(s); this run asks for ZeRO stage {stage} on {world}: rerun with "
                         f"distributed.zero_stage={stage0} distributed.num_workers={world0}, or use another run "
                         f"directory")
