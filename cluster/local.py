"""Local, loopback-only Ray and MLflow defaults (README, "Security: what listens where"), and path resolution.

Loopback: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray` is imported, into
`ray._private.ray_constants.ENABLE_RAY_CLUSTER`; with it true (Linux's default) a node takes the
machine's outward address and its servers listen on every interface. `loopback_env()` therefore runs
when `cluster`, `stages` or `pipelines` is imported (their package `__init__`), before anything imports
Ray, and `ensure_ray()` sets the constant itself when Ray was imported first. A RAY_ADDRESS that names
another host is the user's cluster: then nothing is changed.

Paths: a relative path in a config is taken from the directory the command was run in (the current
working directory of the driver), once, when the config is loaded; workers receive absolute paths.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_PRESETS = {"cpu": "cpu.json", "v100": "v100.json"}  # shipped in cluster/deepspeed/
_LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")
_NAMED_STORES = ("databricks", "databricks-uc", "uc")  # tracking URIs without a scheme that are not paths


def is_loopback_host(host: str) -> bool:
    host = host.strip().lower()
    return host.startswith("127.") or host in _LOOPBACK_HOSTS


def names_remote_cluster(address: str | None) -> bool:
    """True when a Ray address names a host other than this machine's loopback ("auto": whatever runs here)."""
    from urllib.parse import urlsplit

    address = (address or "").strip()
    if address in ("", "local"):
        return False
    if address == "auto":
        return True
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return not is_loopback_host(host)


def wants_loopback() -> bool:
    return not names_remote_cluster(os.environ.get("RAY_ADDRESS"))


def loopback_env() -> None:
    """Environment that keeps Ray on 127.0.0.1 (unless RAY_ADDRESS names a cluster) and everything offline.

    Must run before `ray` is imported: see the module docstring. A value the user set is kept.
    """
    if wants_loopback():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        # Ray workers run in other directories: a relative store must mean the caller's.
        os.environ["MLFLOW_TRACKING_URI"] = absolute_uri(os.environ["MLFLOW_TRACKING_URI"])


def _force_loopback_constant() -> None:
    """Ray imported before loopback_env (a user's script, a notebook): set what it read at import."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes ray.init starts
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def ensure_ray(num_cpus: int | None = None):
    """Join the Ray cluster named by RAY_ADDRESS (or a running job's), else start a loopback one."""
    loopback_env()
    import ray

    if ray.is_initialized():
        return ray
    from cluster.progress import worker_env

    env_vars = {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", **worker_env()}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if not names_remote_cluster(address):
            _force_loopback_constant()
        if "://" not in address:
            env_vars["RAY_ADDRESS"] = address  # see below: the State API inside workers
        ray.init(address=address if "://" not in address else "auto", runtime_env={"env_vars": env_vars},
                 log_to_driver=True)
        return ray
    _force_loopback_constant()
    # address="local": always a fresh loopback instance, never a cluster someone else started here.
    # The dashboard (on 127.0.0.1) serves Ray's State API, which Ray Train's PlacementGroupCleaner needs:
    # without it, a trial that Tune stops mid-run leaks its workers' placement group (measured: 1 CPU of 2
    # stayed reserved and the next trial's workers never started). The cleaner finds the cluster through
    # RAY_ADDRESS, else by scanning this machine's processes, which fails as soon as a second Ray runs here
    # ("Found multiple active Ray instances"): so the GCS port is chosen here and given to every worker.
    # Free ports, not 8265 / 6379: those stay for a head the user starts (cluster/start_local.sh).
    gcs_port = free_port()
    env_vars["RAY_ADDRESS"] = f"{LOOPBACK}:{gcs_port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by ray.init when it starts the GCS
    try:
        ray.init(address="local", num_cpus=num_cpus or max(2, usable_cpus()), include_dashboard=True,
                 dashboard_host=LOOPBACK, dashboard_port=free_port(), _node_ip_address=LOOPBACK,
                 runtime_env={"env_vars": env_vars}, log_to_driver=True)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return ray


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a cgroup cpuset, taskset,
    or a slot of bench/table2_local.py), else os.cpu_count(); at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this OS (macOS)
        return max(1, os.cpu_count() or 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def cluster_is_loopback() -> bool:
    """Every alive node of the connected Ray cluster has a loopback address (a single-machine cluster)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(is_loopback_host(n.get("NodeManagerAddress", "")) for n in nodes)


class ResourcesUnavailable(ValueError):
    """A training job asks for more of a resource than the Ray cluster has."""


def check_resources(asked: dict[str, float], what: str) -> None:
    """Refuse at once an ask that the connected cluster cannot meet (one line: asked and available).

    On a loopback cluster the answer is final. A cluster elsewhere may grow (autoscaler): there the
    shortfall is printed as a notice and Ray waits for nodes.
    """
    import ray

    have = ray.cluster_resources()
    short = {k: v for k, v in asked.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    line = (f"{what} asks for {_fmt(asked)}; the Ray cluster has {_fmt({k: have.get(k, 0.0) for k in asked})} "
            f"in all")
    if cluster_is_loopback():
        raise ResourcesUnavailable(line)
    print(f"notice: {line}; waiting for the cluster to add nodes", file=sys.stderr, flush=True)


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items())


# -- paths ---------------------------------------------------------------------------------------------------
def resolve(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """A path from a config: `~` expanded; a relative one is taken from `base` (default: the working directory).

    Never from the repository: a file of the same name there is not a fallback.
    """
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base or Path.cwd()) / p
    return p.resolve()


def deepspeed_file(value: str, base: str | os.PathLike | None = None) -> Path:
    """`distributed.deepspeed`: a preset name (cpu, v100: the files shipped in cluster/deepspeed/) or a path."""
    if value in DEEPSPEED_PRESETS:
        return Path(__file__).resolve().parent / "deepspeed" / DEEPSPEED_PRESETS[value]
    return resolve(value, base)


def absolute_uri(uri: str, base: str | os.PathLike | None = None) -> str:
    """An MLflow tracking URI with a relative file path made absolute (sqlite:///rel.db, ./mlruns, file:rel)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        if rest and rest != ":memory:":
            return f"sqlite:///{resolve(rest, base)}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file://"):
        return resolve(uri[len("file:"):], base).as_uri()
    if "://" not in uri and ":" not in uri.split("/", 1)[0] and uri not in _NAMED_STORES:  # a path: a file store
        return str(resolve(uri, base))
    return uri


def tracking_uri(run_root: str | os.PathLike, explicit: str | None = None) -> str:
    """The config's URI if set, else MLFLOW_TRACKING_URI, else a SQLite store under the run root; absolute."""
    if explicit:
        return absolute_uri(explicit)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_uri(os.environ["MLFLOW_TRACKING_URI"])
    root = resolve(run_root)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"
