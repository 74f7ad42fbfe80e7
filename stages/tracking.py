"""The one tracking module: every MLflow call of pcpp goes through here (start a run, log, finish).

- `client(uri)`: one MlflowClient per store URI, per process.
- `start_run(...)` / `start_training_run(...)`: create a run (a training run directory's run is reused on
  resume); `Run(uri, run_id)`: log metrics, params, files, text and tags to it, then `finish` it.
- `kernel_tags()`: the fused-kernel path (tag pcpp.kernels), set when a training run starts (the driver's
  PCPP_FUSED, which cluster.progress.worker_env passes on to the workers) and by rank 0 with every epoch
  (the path the worker ran, with any compile failure).
- `log_to_run(ctx, ...)`: a pipeline stage's child run.
- `one_line(error)`: a failure as one line.

A run directory remembers its MLflow run (`mlflow_run_id`); when that run was deleted (the UI's delete,
`MlflowClient.delete_run`) or is missing from the store, a rerun starts a new run and says so in one
line instead of failing. A deleted experiment is refused with the command that restores it.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pcpp import kernels, tasks

RUN_ID_FILE = "mlflow_run_id"
_RAISED = re.compile(r"^[\w.]*(Error|Exception|Exit)\b[^:]*: ")


MAX_PARAM_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE = 250, 6000, 5000  # MLflow's limits (SQL store)


@functools.cache
def client(uri: str):
    """The MlflowClient of store `uri` (created once per process and URI)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


@dataclass(frozen=True)
class Run:
    """One MLflow run of store `uri`: what a stage or a training worker logs to (built once, passed in)."""

    uri: str
    run_id: str

    @property
    def client(self):
        return client(self.uri)

    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Numbers only (other values are skipped), as floats, at `step` (MLflow's default 0 when None)."""
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.client.log_metric(self.run_id, k, float(v), step=step)

    def log_epoch(self, metrics: Mapping, step: int) -> None:
        """An epoch's metrics (`log_metrics`) and the fused-kernel path this process ran it on (`kernel_tags`)."""
        self.log_metrics(metrics, step=step)
        self.set_tags(kernel_tags())

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        items = [Param(k[:MAX_PARAM_KEY], str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # one commit per 100 params (log_batch's limit), not one each
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_files(self, files: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: Mapping) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED", message: str = "", pcpp_status: str | None = None) -> None:
        """End the run: MLflow `status` (FINISHED, FAILED, KILLED), tags pcpp.status and pcpp.message if given."""
        if pcpp_status is not None:
            self.client.set_tag(self.run_id, "pcpp.status", pcpp_status)
        if message:
            self.client.set_tag(self.run_id, "pcpp.message", message[:MAX_TAG_VALUE])
        self.client.set_terminated(self.run_id, status=status)


def kernel_tags() -> dict[str, str]:
    """The fused-kernel path of this process (pcpp.kernels, PCPP_FUSED): tag pcpp.kernels (auto, compile, eager
    or reference) and, where compiling failed and the kernels ran eagerly, pcpp.kernels.compile_failures
    (device type: error, one per device type: after a failure that device never compiles again)."""
    tags = {"pcpp.kernels": kernels.mode()}
    failures = kernels.compile_failures()
    if failures:
        text = "; ".join(f"{device}: {error}" for device, error in sorted(failures.items()))
        tags["pcpp.kernels.compile_failures"] = text[:MAX_TAG_VALUE]
    return tags


def start_run(uri: str, experiment: str, artifact_root: Path, *, run_name: str | None = None,
              parent_run_id: str | None = None, tags: Mapping | None = None) -> Run:
    """A new run in `experiment` (created, artifacts under `artifact_root`, when it does not exist yet)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    c = client(uri)
    tags = dict(tags or {})
    if run_name:
        tags[MLFLOW_RUN_NAME] = run_name
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return Run(uri, c.create_run(experiment_id(c, experiment, artifact_root), tags=tags).info.run_id)


def log_to_run(ctx, metrics: dict | None = None, files: list[Path] | None = None,
               params: dict | None = None) -> None:
    """Metrics, params and files to a stage's MLflow child run (`ctx.run_id` in `ctx.tracking_uri`), if any."""
    if not (ctx.run_id and ctx.tracking_uri):
        return
    run = Run(ctx.tracking_uri, ctx.run_id)
    run.log_metrics(metrics or {})
    run.log_params(params or {})
    run.log_files(files or [])


def one_line(error: BaseException) -> str:
    """An error as one line: the innermost `SomeError: message` of a traceback Ray wrapped around it, else
    the error's type and its first line (MLflow's messages)."""
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if _RAISED.match(line)), None) if len(lines) > 1 else None
    return cause or f"{type(error).__name__}: {lines[0] if lines else ''}"


def experiment_id(client, name: str, artifact_root: Path) -> str:
    """The id of experiment `name`, created (artifacts under `artifact_root`) when it does not exist yet."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=Path(artifact_root).resolve().as_uri())
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {name!r} (id {exp.experiment_id}) was deleted: restore it "
                         f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose another "
                         f"experiment name")
    return exp.experiment_id


def run_state(client, run_id: str) -> str:
    """'active', 'deleted' (moved to the trash) or 'missing' (not in this store)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            return "missing"
        raise
    return "deleted" if run.info.lifecycle_stage == "deleted" else "active"


def reuse_run(client, run_dir: Path) -> str | None:
    """The run this run directory remembers, set RUNNING again; None (with a notice) when it is gone."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.exists():
        return None
    run_id = id_file.read_text().strip()
    state = run_state(client, run_id) if run_id else "missing"
    if state == "active":
        client.update_run(run_id, status="RUNNING")
        return run_id
    print(f"notice: MLflow run {run_id} of {run_dir} is {state}; logging to a new run", file=sys.stderr, flush=True)
    id_file.unlink()
    return None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def start_training_run(cfg, run_dir: Path, uri: str, parent_run_id: str | None = None, run_name: str | None = None,
                       nested_tags: dict | None = None) -> str:
    """Create (or reuse, on resume) the MLflow run of a training run directory; returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    c = client(uri)
    run_id = reuse_run(c, run_dir)
    if run_id is not None:
        return run_id
    tags = {MLFLOW_RUN_NAME: run_name or cfg.name, "pcpp.pipeline": cfg.pipeline, "pcpp.init": cfg.init,
            "pcpp.rule": cfg.algorithm.rule, **kernel_tags(), **(nested_tags or {})}
    if cfg.binarize is not None:
        weight = cfg.binarize.weight
        tags.update({"pcpp.task": cfg.binarize.task, "pcpp.units": cfg.binarize.units,
                     "pcpp.variant": weight if isinstance(weight, str) else weight.get("name", "?")})
    else:
        tags.update({"pcpp.task": tasks.FP, "pcpp.variant": "fp"})
    run = start_run(uri, cfg.tracking.experiment, Path(cfg.tracking.run_root) / "mlartifacts",
                    parent_run_id=parent_run_id, tags=tags)
    run.log_params(flatten(cfg.to_dict()))
    (Path(run_dir) / RUN_ID_FILE).write_text(run.run_id)
    _replay_history(run, Path(run_dir) / "epochs.jsonl")
    return run.run_id


def _replay_history(run: Run, history: Path) -> None:
    """A new run for a run directory that already trained (its run was deleted) gets the epochs done so far."""
    import json

    if not history.exists():
        return
    for line in history.read_text().splitlines():
        record = json.loads(line)
        epoch = int(record.pop("epoch"))
        run.log_metrics(record, step=epoch)
