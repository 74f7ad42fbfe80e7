"""MLflow runs of pcpp: experiments, a training run's run (created, or reused on resume), failures in one line.

A run directory remembers its MLflow run (`mlflow_run_id`); when that run was deleted (the UI's delete,
`MlflowClient.delete_run`) or is missing from the store, a rerun starts a new run and says so in one
line instead of failing. A deleted experiment is refused with the command that restores it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RUN_ID_FILE = "mlflow_run_id"
_RAISED = re.compile(r"^[\w.]*(Error|Exception|Exit)\b[^:]*: ")


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
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(uri)
    run_id = reuse_run(client, run_dir)
    if run_id is not None:
        return run_id
    exp_id = experiment_id(client, cfg.tracking.experiment, Path(cfg.tracking.run_root) / "mlartifacts")
    tags = {MLFLOW_RUN_NAME: run_name or cfg.name, "pcpp.pipeline": cfg.pipeline,
            "pcpp.rule": cfg.algorithm.rule, **(nested_tags or {})}
    if cfg.binarize is not None:
        weight = cfg.binarize.weight
        tags.update({"pcpp.task": cfg.binarize.task, "pcpp.units": cfg.binarize.units,
                     "pcpp.variant": weight if isinstance(weight, str) else weight.get("name", "?")})
    else:
        tags.update({"pcpp.task": "FP", "pcpp.variant": "fp"})
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    for k, v in flatten(cfg.to_dict()).items():
        client.log_param(run_id, k[:250], str(v)[:6000])
    (Path(run_dir) / RUN_ID_FILE).write_text(run_id)
    _replay_history(client, run_id, Path(run_dir) / "epochs.jsonl")
    return run_id


def _replay_history(client, run_id: str, history: Path) -> None:
    """A new run for a run directory that already trained (its run was deleted) gets the epochs done so far."""
    import json

    if not history.exists():
        return
    for line in history.read_text().splitlines():
        record = json.loads(line)
        epoch = int(record.pop("epoch"))
        for k, v in record.items():
            if isinstance(v, (int, float)):
                client.log_metric(run_id, k, float(v), step=epoch)
