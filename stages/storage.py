"""Where a training run's checkpoints live, how a relaunch finds them, and how restarts are counted.

Every epoch each Ray Train worker saves its DeepSpeed shard into a directory of its own and reports it with
`ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))`; Ray persists all ranks' files
into one checkpoint directory `<storage>/<ray run name>/epoch-NNNN/` (a local path, a shared mount, or a
pyarrow URI such as s3://bucket/prefix) and keeps `distributed.checkpoints_to_keep` of them. A restarted
worker group, and a relaunched driver with the same run directory (the Ray run name is derived from it),
resume from `ray.train.get_checkpoint()`: Ray Train V2 reads its snapshot of reported checkpoints from
the storage path when a trainer with the same name starts.

A checkpoint directory holds DeepSpeed's layout under `checkpoints/` (`latest`, `<tag>/...`) and
`checkpoints/pcpp_checkpoint.json` (epoch, step, ZeRO stage, world size and the metrics of every epoch so
far, from which rank 0 restores the run directory's epochs.jsonl and MLflow after a restart).

Restarts: every worker appends one line per start to `<run dir>/starts.jsonl` (the driver's launch id, its
rank, its Ray node, the epoch it resumes at); a launch's restarts are its rank-0 starts minus one.

Test hook (`PCPP_TEST_FAULT`, JSON): `{"epoch": E, "step": S, "marker": PATH, "rank": R | "node_id": ID,
"action": "kill" | "pause"}` makes that worker, at step S (0-based) of epoch E (1-based), SIGKILL itself
("kill") or write its pid to PATH and wait to be killed from outside ("pause"), once: the marker file
records that it happened, so a restarted worker carries on. Read by the driver and handed to the workers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from stages.hashing import digest

STATE = "pcpp_checkpoint.json"  # inside a checkpoint's checkpoints/ directory
STARTS = "starts.jsonl"
FAULT_ENV = "PCPP_TEST_FAULT"
CHECKPOINT_PREFIX = "epoch-"
STORAGE_MARK = "storage.txt"  # in the run directory: where its Ray checkpoints are (written by fit)


def storage_root(cfg, run_dir: Path) -> str:
    """RunConfig(storage_path): distributed.storage_path, else `<run dir>/ray` (inside the run root)."""
    return cfg.distributed.storage_path or str(Path(run_dir) / "ray")


def ray_run_name(cfg, run_dir: Path) -> str:
    """RunConfig(name): stable for a run directory, so a relaunched driver finds the run in shared storage."""
    return f"{cfg.name}-{digest(str(Path(run_dir).resolve()), 12)}"


def checkpoint_dir_name(epoch: int) -> str:
    """The name of the checkpoint directory of a completed epoch (1-based) in the Ray run's storage."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def _filesystem(storage: str):
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())


def stored_state(storage: str, name: str) -> dict | None:
    """The pcpp_checkpoint.json of the newest complete checkpoint of Ray run `name` under `storage`, or None."""
    import pyarrow.fs

    try:
        fs, root = _filesystem(storage)
        base = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(base).type != pyarrow.fs.FileType.Directory:
            return None
    except (OSError, ValueError) as e:  # no credentials, no such bucket, an unknown scheme
        raise ValueError(f"distributed.storage_path {storage!r} cannot be read: {e}") from None
    dirs = sorted((i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(base))
                   if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)),
                  reverse=True)
    for d in dirs:
        path = f"{base}/{d}/checkpoints/{STATE}"
        if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
    return None


def check_storage_unchanged(run_dir: Path, storage: str, ray_name: str) -> None:
    """Refuse a relaunch whose storage path differs from the one the run's checkpoints were reported to
    while that one still holds them: the run would start over from epoch 0 and redo what is done.
    ValueError naming both paths."""
    mark = Path(run_dir) / STORAGE_MARK
    if not mark.exists():
        return
    before = mark.read_text().strip()
    if before and before != storage and stored_state(before, ray_name) is not None:
        raise ValueError(f"distributed.storage_path {storage!r}: this run's checkpoints are in {before!r} "
                         f"({mark}); set distributed.storage_path back to it (or move them there) to resume, or "
                         f"delete {Path(run_dir)} (or use another tracking.run_root) to start over")


# -- restarts ------------------------------------------------------------------------------------------------
def record_start(run_dir: Path, launch: str | None, rank: int, node: str | None, start_epoch: int) -> None:
    """One line per worker start (restarts count rank 0's): one short append, so ranks do not clash."""
    line = json.dumps({"launch": launch, "rank": rank, "node": node, "start_epoch": start_epoch,
                       "time": round(time.time(), 3)})
    with (Path(run_dir) / STARTS).open("a") as f:
        f.write(line + "\n")


def starts(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / STARTS
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def restarts(run_dir: Path, launch: str | None = None) -> int:
    """Worker-group restarts by Ray: of launch `launch`, or summed over every launch of the run directory."""
    per_launch: dict[str, int] = {}
    for s in starts(run_dir):
        if s["rank"] == 0 and (launch is None or s["launch"] == launch):
            per_launch[s["launch"]] = per_launch.get(s["launch"], 0) + 1
    return sum(max(n - 1, 0) for n in per_launch.values())


# -- the test hook -------------------------------------------------------------------------------------------
def fault_spec() -> dict | None:
    """The PCPP_TEST_FAULT of the driver's environment, checked (ValueError naming what is wrong)."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    spec = json.loads(text)
    missing = [k for k in ("epoch", "step", "marker") if k not in spec]
    if missing or not ({"rank", "node_id"} & set(spec)) or spec.get("action", "kill") not in ("kill", "pause"):
        raise ValueError(f"{FAULT_ENV}={text!r}: needs epoch, step, marker, rank or node_id, and action kill or "
                         f"pause")
    return spec


class Fault:
    """The test hook inside one worker (a no-op without a spec)."""

    def __init__(self, spec: dict | None, rank: int, node: str | None):
        hit = spec and (("rank" in spec and spec["rank"] == rank) or ("node_id" in spec and spec["node_id"] == node))
        self.spec = spec if hit else None

    def at(self, epoch: int, step: int) -> None:
        """Called before step `step` (0-based) of epoch `epoch` (0-based)."""
        s = self.spec
        if s is None or (epoch + 1, step) != (s["epoch"], s["step"]):
            return
        try:
            fd = os.open(s["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once: a restarted worker goes on
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        if s.get("action", "kill") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + float(s.get("pause_s", 600))
        while time.monotonic() < deadline:  # "pause": the test kills this node from outside
            time.sleep(0.2)
        raise RuntimeError(f"{FAULT_ENV}: nobody killed paused worker {os.getpid()}")

