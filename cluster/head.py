"""A loopback Ray head in its own processes (`ray start --head`), for `ray job submit` and tests.

`pcpp train` joins RAY_ADDRESS or starts Ray inside its own process (`cluster.local.ensure_ray`). This is
the other way of working: a head that outlives the caller and takes jobs through its dashboard, as a
cluster started by `ray up ray_cluster.yaml` does. `cluster/start_local.sh` and `stop_local.sh` do the
same from a shell. Everything binds to 127.0.0.1.

Clients (`ray job submit`, `ray status`, `ray.init(address=...)`) need two settings besides the address,
both in `client_env()`: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray rewrites 127.0.0.1 in an
address to the machine's outward IP, where nothing listens; and RAY_AUTH_MODE=token when the head uses
Ray's token authentication (Ray 2.60 turns it on whenever this user has a token, e.g. ~/.ray/auth_token
written by a local ray.init(); the head's mode is made explicit here so that it is known).

Stopping is exact: `ray start` runs in a new session, every process of the head (GCS, raylet, dashboard,
agents, workers) inherits that session id, and `stop_head` signals those processes by pid. `ray stop`
is not used because it stops every Ray process of the user on the machine, found by name.

`start_worker_node` joins a second node on 127.0.0.1 (its own temp dir, custom resources; cluster/node.py)
to such a head: a multi-node cluster on one machine, for tests of placement and of losing a node.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.local import LOOPBACK, REPO_ROOT, free_port  # noqa: F401  (free_port: part of this module's API)

# Ray's unix sockets live at TEMP_DIR/session_<date>_<pid>/sockets/..., and a socket path may not exceed
# 107 bytes: that leaves about 40 characters for the temp dir itself.
MAX_TEMP_DIR_CHARS = 40


@dataclass(frozen=True)
class Head:
    """One head started by `start_head`."""

    dashboard: str  # http://127.0.0.1:PORT: RAY_ADDRESS for `ray job submit`, the dashboard's REST API
    gcs_address: str  # 127.0.0.1:PORT: for `ray status --address`, `ray.init(address=...)`
    temp_dir: str  # Ray's --temp-dir: session logs are under it
    session_id: int  # the session of the `ray start` process, shared by every process of the head
    owns_temp_dir: bool  # created by start_head, removed by stop_head
    auth_mode: str  # "token" or "disabled": Ray's RAY_AUTH_MODE for the head and its clients


_HEADS: dict[str, Head] = {}


def ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment, else the repo's .venv, else the one on PATH."""
    for candidate in (Path(sys.executable).with_name("ray"), REPO_ROOT / ".venv" / "bin" / "ray"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError("no `ray` executable: install ray[default] (`make install` creates .venv)")
    return found


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _has_token() -> bool:
    try:
        from ray._raylet import AuthenticationTokenLoader

        return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))
    except Exception:
        return False


def auth_headers() -> dict[str, str]:
    """The `Authorization` header of Ray's token authentication, if this user has a token.

    Ray 2.60 turns token authentication on for `ray start --head` when a token exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); the dashboard's REST API then answers 401 without it.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader

        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True) or {})
    except Exception:  # no token, or a Ray without token authentication
        return {}


def _get_json(url: str, timeout: float = 2.0):
    # No proxies: an http_proxy in the environment must never see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=auth_headers()), timeout=timeout) as r:
        return json.loads(r.read().decode())


def dashboard_version(address: str) -> dict | None:
    """The dashboard's /api/version answer (ray_version, ...), or None while it does not answer."""
    try:
        return _get_json(address.rstrip("/") + "/api/version")
    except (OSError, ValueError):
        return None


def running_heads() -> list[Head]:
    """The heads this process started and has not stopped yet."""
    return list(_HEADS.values())


def client_env(address: str | None = None) -> dict[str, str]:
    """Environment for a client of a head started here (default: the last one started).

    RAY_ADDRESS (the dashboard, for `ray job submit`), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (keep 127.0.0.1
    as is) and RAY_AUTH_MODE. Use as `subprocess.run([...], env={**os.environ, **client_env()})`; for
    `ray status` / `ray.init` pass the head's `gcs_address` explicitly.
    """
    if not _HEADS:
        raise RuntimeError("no head was started by this process (cluster.head.start_head)")
    head = _HEADS[address] if address else list(_HEADS.values())[-1]
    return {"RAY_ADDRESS": head.dashboard, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": head.auth_mode}


def start_head(num_cpus: int = 4, dashboard_port: int = 8265, temp_dir: str | os.PathLike | None = None, *,
               port: int | None = None, timeout: float = 90.0, env: dict[str, str] | None = None) -> str:
    """Start a Ray head bound to 127.0.0.1 and wait until its dashboard answers; returns its address.

    The address (`http://127.0.0.1:<dashboard_port>`) is what `ray job submit --address` and RAY_ADDRESS
    take. `port` is the GCS port (default: a free one, so a head on 6379 elsewhere does not collide);
    the ray-client and dashboard-agent ports are picked free as well. `temp_dir` defaults to a new
    short directory under /tmp, removed again by `stop_head`; a given one must be at most
    MAX_TEMP_DIR_CHARS characters long (Ray's socket paths) and is kept. Token authentication is on when
    this user has a Ray token (as `ray start` decides by itself), off otherwise; see `client_env()`.
    `env` adds variables to the head's environment (Ray's RAY_* system settings, e.g. health checks).
    """
    if _port_in_use(dashboard_port):
        raise RuntimeError(f"{LOOPBACK}:{dashboard_port} is already in use: pass another dashboard_port "
                           f"(cluster.head.free_port() finds one)")
    owns = temp_dir is None
    if owns:
        tmp = Path(tempfile.mkdtemp(prefix="pcpp-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    else:
        tmp = Path(temp_dir).expanduser().resolve()
        tmp.mkdir(parents=True, exist_ok=True)
    if len(str(tmp)) > MAX_TEMP_DIR_CHARS:
        if owns:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"temp_dir {str(tmp)!r} is longer than {MAX_TEMP_DIR_CHARS} characters: Ray's unix "
                         f"socket paths under it would exceed 107 bytes (use a short path such as /tmp/ray-x)")
    gcs_port = port or free_port()
    cmd = [ray_executable(), "start", "--head", f"--num-cpus={num_cpus}",
           f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
           f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--temp-dir={tmp}", "--disable-usage-stats"]
    auth_mode = "token" if _has_token() else "disabled"
    env = {**os.environ, **(env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": auth_mode}
    env.pop("RAY_ADDRESS", None)
    log = tmp / "ray-start.log"
    deadline = time.monotonic() + timeout
    with log.open("w") as out:
        # A file, not a pipe: the daemons outlive `ray start`, and a pipe they inherited would never close.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        head = Head(dashboard=f"http://{LOOPBACK}:{dashboard_port}", gcs_address=f"{LOOPBACK}:{gcs_port}",
                    temp_dir=str(tmp), session_id=proc.pid, owns_temp_dir=owns, auth_mode=auth_mode)
        _HEADS[head.dashboard] = head  # registered first, so that every failure below can clean up
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        raise _failed(head, f"`ray start` {'timed out' if rc is None else f'exited with {rc}'}", log)
    while True:
        try:
            _get_json(head.dashboard + "/api/version")
            return head.dashboard
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # a token this process cannot present: waiting will not help
                raise _failed(head, f"the dashboard refused our token ({e.code}); auth mode {auth_mode}", log) from e
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise _failed(head, f"the dashboard did not answer on {head.dashboard} within {timeout:.0f} s", log)
        time.sleep(0.25)


def _failed(head: Head, what: str, log: Path) -> RuntimeError:
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    stop_head(head.dashboard)
    return RuntimeError(f"{what}; `ray start` said:\n{tail}")


def _session_processes(session_id: int):
    import psutil

    me, my_session, uid = os.getpid(), os.getsid(0), os.getuid()
    if session_id == my_session:  # never the caller's own session
        return []
    procs = []
    for p in psutil.process_iter():
        try:
            if p.pid != me and os.getsid(p.pid) == session_id and p.uids().real == uid:
                procs.append(p)
        except (OSError, psutil.Error):
            continue
    return procs


def _terminate(procs, timeout: float) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""


def stop_head(address: str | None = None, timeout: float = 15.0) -> None:
    """Stop the head started at `address` (default: every head this process started); no-op if none.

    In `ray stop`'s order: the raylet first (its agents and workers follow it), then the rest, the GCS
    last (it waits for its clients otherwise); SIGTERM, then SIGKILL to whatever is alive after a third
    of `timeout` seconds.
    """
    if address is None:
        heads = list(_HEADS.values())
        _HEADS.clear()
    else:
        heads = [_HEADS.pop(address)] if address in _HEADS else []
    for head in heads:
        procs = _session_processes(head.session_id)
        raylet = [p for p in procs if _name(p) == "raylet"]
        gcs = [p for p in procs if _name(p) == "gcs_server"]
        _terminate(raylet, timeout / 3)
        _terminate([p for p in _session_processes(head.session_id) if p not in gcs], timeout / 3)
        _terminate([p for p in _session_processes(head.session_id)], timeout / 3)
        if head.owns_temp_dir:
            shutil.rmtree(head.temp_dir, ignore_errors=True)


# -- a second node on this machine ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerNode:
    """One node started by `start_worker_node`: its processes share the session of its `ray start`."""

    gcs_address: str
    temp_dir: str
    session_id: int
    resources: dict

    def processes(self):
        """The node's live processes (raylet, its agents, its Ray workers), by session id."""
        return _session_processes(self.session_id)

    def raylet(self):
        return next((p for p in self.processes() if _name(p) == "raylet"), None)


_NODES: list[WorkerNode] = []


def start_worker_node(gcs_address: str, num_cpus: int = 1, resources: dict | None = None, *,
                      timeout: float = 90.0, env: dict[str, str] | None = None) -> WorkerNode:
    """Join a second Ray node on 127.0.0.1 to the head at `gcs_address`, with its own temp dir and custom
    `resources`; returns when the node has started (its raylet registered with the GCS).

    `ray start --address` cannot do this on loopback (see cluster/node.py, which starts the node the way
    `ray start` does after its checks). For tests of placement and node loss: stop it with
    `stop_worker_node` (its processes by session id), or kill its raylet (`WorkerNode.raylet()`) to lose it.
    """
    tmp = Path(tempfile.mkdtemp(prefix="pcpp-n-", dir="/tmp" if os.path.isdir("/tmp") else None))
    cmd = [sys.executable, "-m", "cluster.node", f"--address={gcs_address}", f"--num-cpus={num_cpus}",
           f"--resources={json.dumps(resources or {})}", f"--temp-dir={tmp}",
           f"--dashboard-agent-listen-port={free_port()}"]
    head = next((h for h in _HEADS.values() if h.gcs_address == gcs_address), None)
    run_env = {**os.environ, **(env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": head.auth_mode if head else ("token" if _has_token() else "disabled"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run_env.pop("RAY_ADDRESS", None)
    log = tmp / "node-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=run_env,
                                start_new_session=True)
        node = WorkerNode(gcs_address=gcs_address, temp_dir=str(tmp), session_id=proc.pid,
                          resources=dict(resources or {}))
        _NODES.append(node)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        stop_worker_node(node)
        what = "timed out" if rc is None else f"exited with {rc}"
        raise RuntimeError(f"starting a node joined to {gcs_address} {what}; it said:\n{tail}")
    return node


def stop_worker_node(node: WorkerNode | None = None, timeout: float = 15.0) -> None:
    """Stop `node` (default: every node started here): raylet first, then the rest; its temp dir removed."""
    nodes = [node] if node is not None else list(_NODES)
    for n in nodes:
        if n in _NODES:
            _NODES.remove(n)
        _terminate([p for p in n.processes() if _name(p) == "raylet"], timeout / 2)
        _terminate(n.processes(), timeout / 2)
        shutil.rmtree(n.temp_dir, ignore_errors=True)


atexit.register(stop_head)  # a head must not outlive a test session that forgot (or failed) to stop it
atexit.register(stop_worker_node)  # registered last, so it runs first: a node goes before its head
