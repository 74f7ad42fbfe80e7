"""torch.distributed for Ray Train workers on a single-machine (loopback) cluster, bound to 127.0.0.1.

Ray's TorchConfig rendezvous (ray/train/torch/config.py, `_TorchBackend.on_start`) gives the workers
MASTER_ADDR = the node's address and a free port; rank 0 then starts torch's TCPStore, whose server
listens on every interface whatever host it is given (measured: `TCPStore("127.0.0.1", 0, is_master=True)`
listens on `*:PORT`), and gloo binds to the address the hostname resolves to. Here rank 0 binds the
store's socket itself, on 127.0.0.1, and hands it to TCPStore (`master_listen_fd`); gloo and NCCL are
told the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME). Everything else is Ray's.
A cluster of several machines keeps Ray's TorchConfig (`torch_config()` chooses).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

from cluster.local import LOOPBACK

_LISTENER: socket.socket | None = None  # rank 0's store socket, alive as long as the worker
_STORE = None


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs):
            return name
    return "lo"


def _listen_on_loopback() -> int:
    global _LISTENER
    _LISTENER = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _LISTENER.bind((LOOPBACK, 0))
    _LISTENER.listen(128)
    return _LISTENER.getsockname()[1]


def _loopback_env(port: int, interface: str) -> None:
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": interface,
                       "NCCL_SOCKET_IFNAME": interface})


def _init_process_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    global _STORE
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        _STORE = dist.TCPStore(LOOPBACK, port, world_size, True, timeout=timeout,
                               master_listen_fd=_LISTENER.fileno())
    else:
        _STORE = dist.TCPStore(LOOPBACK, port, world_size, False, timeout=timeout)
    if "nccl" in backend:  # as Ray does: fail instead of hanging when a collective times out
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, store=_STORE, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        import ray

        backend = backend_config.backend or "gloo"
        port = worker_group.execute_single(0, _listen_on_loopback)
        worker_group.execute(_loopback_env, port=port, interface=loopback_interface())
        if not isinstance(worker_group, V1WorkerGroup):  # as Ray's on_start: V1 sets them at training start
            worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i, world_size=n,
                                                   port=port, timeout_s=backend_config.timeout_s)
                 for i in range(n)])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group listens on 127.0.0.1 only (all workers on this machine)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config(use_gpu: bool) -> TorchConfig:
    """The loopback rendezvous on a loopback cluster, Ray's own elsewhere."""
    from cluster.local import cluster_is_loopback

    backend = "nccl" if use_gpu else "gloo"
    return LoopbackTorchConfig(backend=backend) if cluster_is_loopback() else TorchConfig(backend=backend)
