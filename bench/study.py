"""A long study that survives restarts (used by bench/cifar10_resnet20.py): which runs are left, what each
invocation cost, the study's MLflow parent run, and the seeds each (variant, task) gets.

A run directory holds what the engine wrote (config.yaml, epochs.jsonl, result.json, mlflow_run_id, Ray's
checkpoints under ray/) and one file of ours, `bench.json` (wall time of each invocation that worked on it).
Its state (`run_state`):
- `done`: its MLflow run ended `finished`, `diverged` or `refused` (tag pcpp.status, run not RUNNING), or, when the
  process died between the worker's last word and the driver's, its result.json says so: never rerun;
- `partial`: epochs recorded but not done: fit() resumes from the last epoch's checkpoint;
- `new`: nothing trained yet.
A run directory made with another configuration than the one planned is refused (`config_differences`),
so a table never mixes settings. The run root holds `study.json`: the study's MLflow parent run (every run
is its child, and the report is logged to it) and one record per invocation (start, wall time, git commit).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DONE = ("finished", "diverged", "refused")  # refused: the activation guard's, as deterministic as a divergence
STUDY_FILE = "study.json"
RUN_RECORD = "bench.json"
STUDY_TAG = "pcpp.study"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# -- seeds -----------------------------------------------------------------------------------------------
def parse_extra_seeds(text: str | None, variants: list[str], tasks: list[str], seed: int) -> dict:
    """`VARIANT:TASK:SEED,...` -> {(variant, task): [seeds]}: runs beside the base `seed`, e.g. `bnn:BW:1`.

    The variant must be one of `variants`, the task one of `tasks` (FP for `fp`), the seed an integer other
    than the base seed and not listed twice. Raises ValueError naming the bad item and the valid values.
    """
    extra: dict[tuple[str, str], list[int]] = {}
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"--extra-seeds item {item!r} is not VARIANT:TASK:SEED (e.g. bnn:BW:1)")
        variant, task, value = parts[0].strip(), parts[1].strip().upper(), parts[2].strip()
        if variant not in variants:
            raise ValueError(f"--extra-seeds item {item!r}: variant {variant!r} is not run; "
                             f"valid: {', '.join(variants)}")
        valid_tasks = ["FP"] if variant == "fp" else tasks
        if task not in valid_tasks:
            raise ValueError(f"--extra-seeds item {item!r}: task {task!r} is not run for {variant}; "
                             f"valid: {', '.join(valid_tasks)}")
        try:
            s = int(value)
        except ValueError:
            raise ValueError(f"--extra-seeds item {item!r}: seed {value!r} is not an integer") from None
        seeds = extra.setdefault((variant, task), [])
        if s == seed or s in seeds:
            raise ValueError(f"--extra-seeds item {item!r}: seed {s} is already run for {variant} {task}")
        seeds.append(s)
    return extra


# -- what is left ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunState:
    state: str  # done | partial | new
    status: str | None = None  # finished | diverged | refused (done), or the MLflow run's pcpp.status / failed
    epochs: int = 0  # epochs recorded in epochs.jsonl
    run_id: str | None = None  # the MLflow run the directory remembers
    mlflow_open: bool = False  # done by result.json while its MLflow run was never closed

    @property
    def left(self) -> bool:
        return self.state != "done"


def recorded_epochs(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "epochs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_state(run_dir: str | Path, tracking_uri: str) -> RunState:
    """What is left of the run in `run_dir` (see the module docstring); reads the MLflow store, writes nothing."""
    from stages.tracking import RUN_ID_FILE, client

    run_dir = Path(run_dir)
    epochs = len(recorded_epochs(run_dir))
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    mlflow_status, active = None, False
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = client(tracking_uri).get_run(run_id)
        except MlflowException:  # not in this store: the engine starts a new run, so shall we
            run = None
        active = run is not None and run.info.lifecycle_stage == "active"
        if active:
            mlflow_status = run.data.tags.get("pcpp.status")
            if run.info.status != "RUNNING" and mlflow_status in DONE:
                return RunState("done", mlflow_status, epochs, run_id)
    result = _read_json(run_dir / "result.json") or {}
    if result.get("status") in DONE:
        return RunState("done", result["status"], epochs, run_id if active else None, mlflow_open=active)
    return RunState("partial" if epochs else "new", mlflow_status or result.get("status"), epochs, run_id)


def close_open_run(tracking_uri: str, run_dir: Path, state: RunState) -> None:
    """End the MLflow run of a run done by its result.json (the driver died before closing it)."""
    from stages.tracking import Run

    if state.mlflow_open and state.run_id:
        result = _read_json(Path(run_dir) / "result.json") or {}
        Run(tracking_uri, state.run_id).finish("FINISHED" if state.status == "finished" else "FAILED",
                                               result.get("message", ""), pcpp_status=state.status)


def config_differences(run_dir: Path, planned: dict) -> list[str]:
    """`key: old -> new` for each setting in which the run in `run_dir` differs from the planned config (what
    the run computes, as its digest sees it, quantizer defaults resolved: the run's as recorded in its
    config.resolved.json when it began, the plan's as registered now); [] when it has none yet or they agree.
    A binarized run directory without config.resolved.json (made before it was written) is one difference:
    the defaults its pairs resolved to are unknown."""
    from stages.config import RESOLVED_CONFIG, TrainConfig, absolute, build, load_config, resolved_config
    from stages.tracking import flatten

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return []
    resolved = _read_json(Path(run_dir) / RESOLVED_CONFIG)
    new = flatten(resolved_config(absolute(build(TrainConfig, planned))))
    if resolved is None:
        old = flatten(resolved_config(load_config(path)))
        unknown = ([f"the quantizer defaults it ran with: not recorded ({RESOLVED_CONFIG} is missing) -> "
                    f"{RESOLVED_CONFIG}"] if planned.get("binarize") else [])
    else:
        old, unknown = flatten(resolved), []
    return unknown + [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]


# -- wall time ---------------------------------------------------------------------------------------------
def record_run(run_dir: Path, wall_s: float, status: str, epochs_before: int, epochs_after: int,
               invocation: str = "", device: str | None = None) -> None:
    """Record an invocation's wall time on the run in its bench.json: the entry of the same `invocation`
    is replaced (a heartbeat's `running` entry by the final one), others are kept. `device`: where it ran,
    when known (bench/table2_local.py)."""
    path = Path(run_dir) / RUN_RECORD
    data = _read_json(path) or {"invocations": []}
    entries = [e for e in data["invocations"] if not invocation or e.get("invocation") != invocation]
    entries.append({"invocation": invocation, "wall_s": round(wall_s, 3), "status": status,
                    "epochs_before": epochs_before, "epochs_after": epochs_after,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"device": device} if device else {})})
    data["invocations"] = entries
    _write_json(path, data)


def run_wall_s(run_dir: Path) -> float:
    """Wall time spent on the run over every invocation (0 when none recorded)."""
    data = _read_json(Path(run_dir) / RUN_RECORD) or {"invocations": []}
    return sum(i.get("wall_s", 0.0) for i in data["invocations"])


def git_commit(repo: Path) -> str:
    """HEAD's commit, `+dirty` when tracked files differ from it; `unknown` outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# -- the study ---------------------------------------------------------------------------------------------
class Study:
    """study.json of a run root and the study's MLflow parent run (created once, reused by every resume)."""

    def __init__(self, run_root: Path, tracking_uri: str, experiment: str, name: str, settings: dict,
                 commit: str):
        from stages.tracking import Run, start_run
        from stages.tracking import client as mlflow_client
        from stages.tracking import run_state as mlflow_run_state

        self.path, self.uri = Path(run_root) / STUDY_FILE, tracking_uri
        self.data = _read_json(self.path) or {"invocations": []}
        parent = self.data.get("parent_run_id")
        if parent and mlflow_run_state(mlflow_client(tracking_uri), parent) == "active":
            mlflow_client(tracking_uri).update_run(parent, status="RUNNING")
            self.run = Run(tracking_uri, parent)
        else:
            self.run = start_run(tracking_uri, experiment, Path(run_root) / "mlartifacts", run_name=name,
                                 tags={STUDY_TAG: name})
            self.run.log_params(settings)
            self.data["parent_run_id"] = self.run.run_id
        self.data["settings"] = settings
        self.started = time.perf_counter()
        self.invocation = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"
        self.data["invocations"].append({"started": self.invocation, "commit": commit, "wall_s": 0.0,
                                         "runs_done": 0})
        self._lock, self._stop, self._current = threading.RLock(), threading.Event(), None
        self.save()

    @property
    def parent_run_id(self) -> str:
        return self.run.run_id

    def save(self, runs_done: int | None = None) -> None:
        """Record this invocation's wall time so far (and runs done), and the run in progress's."""
        with self._lock:
            current = self.data["invocations"][-1]
            current["wall_s"] = round(time.perf_counter() - self.started, 3)
            if runs_done is not None:
                current["runs_done"] = runs_done
            _write_json(self.path, self.data)
            if self._current is not None:
                run_dir, start, before = self._current
                record_run(run_dir, time.perf_counter() - start, "running", before,
                           len(recorded_epochs(run_dir)), self.invocation)

    def begin_run(self, run_dir: Path) -> None:
        with self._lock:
            self._current = (Path(run_dir), time.perf_counter(), len(recorded_epochs(run_dir)))

    def end_run(self, status: str) -> float:
        """Record the run in progress as ended with `status`; returns its wall time in this invocation."""
        with self._lock:
            run_dir, start, before = self._current
            self._current = None
            wall = time.perf_counter() - start
            if run_dir.exists():
                record_run(run_dir, wall, status, before, len(recorded_epochs(run_dir)), self.invocation)
            return wall

    def heartbeat(self, every_s: float = 60.0) -> None:
        """Save every `every_s` seconds from a daemon thread, so that a reboot loses at most that much of the
        wall-time record (the invocation's and the run in progress's)."""
        def beat():
            while not self._stop.wait(every_s):
                try:
                    self.save()
                except OSError as e:  # a full disk must not end the study
                    print(f"[bench] warning: could not save {self.path}: {e}", flush=True)

        threading.Thread(target=beat, name="study-heartbeat", daemon=True).start()

    @property
    def total_wall_s(self) -> float:
        return sum(i.get("wall_s", 0.0) for i in self.data["invocations"])

    @property
    def commits(self) -> list[str]:
        return list(dict.fromkeys(i.get("commit", "unknown") for i in self.data["invocations"]))

    def finish(self, failed: list[str]) -> None:
        self._stop.set()
        self.save()
        self.run.log_metrics({"study_wall_s": self.total_wall_s})
        self.run.finish("FAILED" if failed else "FINISHED",
                        f"{len(failed)} run(s) not done: {', '.join(failed)}" if failed else "")
