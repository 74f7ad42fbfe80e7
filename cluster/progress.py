"""Console verbosity of pcpp commands, through Ray's own mechanisms (README, "Console output").

Quiet (the default of `pcpp run / train / sweep`): the driver prints one line per stage start / end and per
epoch, and errors; `--verbose` restores everything Ray forwards from its workers.

- Progress bars inside Ray tasks and Train workers: `bar()` returns Ray's distributed tqdm
  (ray.experimental.tqdm_ray) there, so the driver draws one live bar per stage instead of Ray's log
  forwarding re-printing every tqdm refresh as a line; elsewhere (or verbose) the plain tqdm.
- Ray Train V2's print patch is turned off in the workers (`worker_env`).
- Forwarded worker lines that are noise (tqdm refreshes of plain bars, Ray Train's repeated
  PlacementGroupCleaner warnings, DeepSpeed's and Ray Train's start-up chatter): dropped by Ray's log
  deduplicator, RAY_DEDUP_LOGS_SKIP_REGEX (read once, when `ray` is imported in the driver: `set_verbose`
  runs before). Lines of Ray's tqdm integration are never skipped by it (ray._private.ray_logging).

A RAY_DEDUP_LOGS_SKIP_REGEX that the user set is kept.
"""

from __future__ import annotations

import os

VERBOSE_ENV = "PCPP_VERBOSE"
FUSED_ENV = "PCPP_FUSED"  # pcpp.kernels.ENV (not imported: it would import torch into every pcpp command)
_SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
_OURS = "PCPP_SET_SKIP_REGEX"  # marks a skip regex set by us, so that set_verbose(True) may remove it

# Forwarded worker lines dropped when quiet. Each alternative names one known kind of noise; errors,
# tracebacks and our own one-line messages match none of them.
QUIET_SKIP = "|".join([
    r"\d+%\|",  # a plain tqdm refresh with a total: " 35%|###5  | 350/1000 [00:00<00:00, ...]"
    r"\[\d\d:\d\d(:\d\d)?[<,] ",  # ... and without one: "read x.tar.gz: 1140file [00:00, 10076.02file/s]"
    r"PlacementGroupCleaner",  # Ray Train V2, every few seconds while the controller winds down
    r"Requesting resources: |Attempting to start training worker group|Started training worker group",
    r"^- \(ip=\S+, pid=\d+\) world_rank=",
    r"has constructor arguments in the object store",  # core_worker: PreemptionWatcher's size notice
    r"deepspeed_shm_comm_op built successfully|real_accelerator\.py|No CUDA runtime is found",
    r"\[INFO\] \[(config|logging|engine|utils|torch|comm|stage_1_and_2|checkpointing)\.py",
    r"Reporting training result \d+: TrainingReport\(",  # Ray Train V2, per report (our epoch line says it)
    r"Checkpoint successfully created at: Checkpoint\(",  # Ray Train, per rank and epoch (checkpoints reported)
])


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def set_verbose(on: bool) -> None:
    """Choose the console for this process and the Ray workers it starts; call before `ray` is imported."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if on:
        if os.environ.pop(_OURS, None):
            os.environ.pop(_SKIP_ENV, None)
    elif _SKIP_ENV not in os.environ:
        os.environ[_SKIP_ENV] = QUIET_SKIP
        os.environ[_OURS] = "1"


def worker_env() -> dict[str, str]:
    """Environment for the Ray workers (ensure_ray's runtime_env). Quiet: Ray Train V2's print patch off
    (RAY_TRAIN_ENABLE_PRINT_PATCH=0): it logs every print of a Train worker a second time when stdout is
    wrapped, and turns each Ray tqdm update (a line ending in a newline) into an extra empty line.
    PCPP_FUSED (pcpp.kernels' path), when set: workers of a cluster started elsewhere do not inherit the
    driver's environment."""
    env = {VERBOSE_ENV: "1" if verbose() else "0"}
    if FUSED_ENV in os.environ:
        env[FUSED_ENV] = os.environ[FUSED_ENV]
    if not verbose():
        env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def in_ray_worker() -> bool:
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE


def bar(iterable=None, *, desc: str = "", total: int | None = None, unit: str = "it", disable: bool = False):
    """A progress bar: Ray's distributed tqdm inside a Ray worker when quiet, else tqdm; `disable` as tqdm's."""
    if not disable and not verbose() and in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(iterable, desc=desc, total=total, unit=unit)
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable)
