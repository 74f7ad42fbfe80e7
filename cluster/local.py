"""Local, loopback-only Ray and MLflow defaults (DESIGN.md "Running locally")."""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]


def loopback_env() -> None:
    """Environment that keeps Ray on 127.0.0.1 and everything offline."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def ensure_ray(num_cpus: int | None = None):
    """Join the Ray cluster named by RAY_ADDRESS (or a running job's), else start a loopback one."""
    loopback_env()
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"] if "://" not in os.environ["RAY_ADDRESS"] else "auto",
                 runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": always a fresh loopback instance, never a cluster someone else started here.
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                 _node_ip_address=LOOPBACK, runtime_env=runtime_env, log_to_driver=True)
    return ray


def resolve(path: str | os.PathLike) -> Path:
    """A path from a config: absolute as is, else relative to the working dir, else to the repo."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def tracking_uri(run_root: str | os.PathLike, explicit: str | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store at an absolute path under the run root."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(run_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"
