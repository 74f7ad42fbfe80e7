"""Two Ray nodes on one machine: a loopback head and a second node (`ray start --address`, its own temp dir,
a custom resource), one training worker on each (2 workers over gloo, `placement_strategy: SPREAD`). The
second node is lost mid-epoch (its raylet and every process of it SIGKILLed, as a machine that dies); Ray
Train restarts the worker group on the node that is left (SPREAD is a preference: both workers fit on the
head), which resumes from the last checkpoint in the shared storage path, and the same `pcpp train` call
ends `finished`, with every epoch once and the weights of an uninterrupted run on the same cluster.

Deterministic: the worker on the second node pauses at a given step (test hook PCPP_TEST_FAULT, action
"pause", writing its pid to a marker file); only then does the test kill the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.head import (
    _get_json,
    client_env,
    free_port,
    running_heads,
    start_head,
    start_worker_node,
    stop_head,
    stop_worker_node,
)
from stages.config import TrainConfig, build
from stages.storage import FAULT_ENV, starts

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# Ray's GCS marks a node dead after failure_threshold missed health checks: 1 s apart here instead of 3 s x 5
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def config(shards, root: Path, storage: Path) -> TrainConfig:
    train, test = shards
    return build(TrainConfig, {
        "name": "mn", "seed": 0, "init": "random", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 320, "eval_limit": 40},
        "binarize": {"weight": "bnn++"}, "optim": {"name": "adam", "lr": 0.01, "epochs": 2},
        "distributed": {"num_workers": 2, "zero_stage": 1, "placement_strategy": "SPREAD",
                        "storage_path": str(storage), "max_failures": 2},
        "tracking": {"run_root": str(root), "experiment": "multinode"}})


@pytest.fixture
def two_nodes():
    """A head (3 CPUs) and a second node (1 CPU, resource node2), both on 127.0.0.1; stopped in any case."""
    head = None
    try:
        head = start_head(num_cpus=3, dashboard_port=free_port(), env=FAST_HEALTH_CHECK)
        gcs = next(h.gcs_address for h in running_heads() if h.dashboard == head)
        node = start_worker_node(gcs, num_cpus=1, resources={"node2": 1}, env=FAST_HEALTH_CHECK)
        yield head, gcs, node, node_id_with(head, "node2")
    finally:
        stop_worker_node()
        if head:
            stop_head(head)


def node_id_with(dashboard: str, resource: str, timeout: float = 60.0) -> str:
    """The id of the alive node that has `resource` (Ray's State API on the head's dashboard)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = _get_json(f"{dashboard}/api/v0/nodes?detail=1")["data"]["result"]["result"]
            found = [n["node_id"] for n in nodes
                     if n.get("state") == "ALIVE" and resource in n.get("resources_total", {})]
            if found:
                return found[0]
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no alive node with resource {resource} on {dashboard}")
        time.sleep(0.5)


def pcpp_train(cfg_file: Path, cwd: Path, head: str, gcs: str, fault: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(client_env(head), RAY_ADDRESS=gcs, PYTHONPATH=str(REPO))
    if fault:
        env[FAULT_ENV] = json.dumps(fault)
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", str(cfg_file)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"pcpp train did not end within {timeout} s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]
    return out


def test_losing_the_second_node_mid_epoch_the_run_finishes_from_the_shared_storage(two_nodes, tiny_shards, tmp_path):
    head, gcs, node, node2 = two_nodes
    storage = tmp_path / "storage"  # every node of this machine sees it, as a shared mount on a cluster
    runs = {}
    for name in ("straight", "lost"):
        cfg = config(tiny_shards, tmp_path / name, storage)
        (tmp_path / f"{name}.yaml").write_text(cfg.to_yaml())
        runs[name] = tmp_path / name / "train" / f"{cfg.name}-{cfg.digest()}"

    t0 = time.monotonic()
    finish(pcpp_train(tmp_path / "straight.yaml", tmp_path, head, gcs))
    straight_s = time.monotonic() - t0
    nodes = {s["node"] for s in starts(runs["straight"])}
    assert len(nodes) == 2 and node2 in nodes  # SPREAD: one worker on each node

    marker = tmp_path / "paused"
    t0 = time.monotonic()
    proc = pcpp_train(tmp_path / "lost.yaml", tmp_path, head, gcs,
                      fault={"node_id": node2, "epoch": 2, "step": 4, "marker": str(marker), "action": "pause"})
    try:
        deadline = time.monotonic() + 300
        while not (marker.exists() and marker.read_text()):  # the node-2 worker has reached epoch 2, step 4
            assert proc.poll() is None and time.monotonic() < deadline, "the worker on node 2 never paused"
            time.sleep(0.2)
        paused_s = time.monotonic() - t0
        raylet = node.raylet()
        assert raylet is not None and int(marker.read_text()) in {p.pid for p in node.processes()}
        raylet.send_signal(signal.SIGKILL)  # the node is lost: raylet first, then everything else of it
        for p in node.processes():
            p.send_signal(signal.SIGKILL)
        out = finish(proc)
    finally:  # a failed wait or assertion leaves no pcpp train driver behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lost_s = time.monotonic() - t0
    print(f"2 nodes, uninterrupted: {straight_s:.1f} s; node 2 lost at epoch 2 step 4 ({paused_s:.1f} s in): "
          f"{lost_s:.1f} s in all, the restart and epoch 2 again after the loss took {lost_s - paused_s:.1f} s")
    assert "finished 2 epochs" in out and "restarted the workers 1 time(s)" in out

    history = starts(runs["lost"])
    launch1 = [s for s in history if s["start_epoch"] == 0]
    launch2 = [s for s in history if s["start_epoch"] == 1]
    assert sorted(s["rank"] for s in launch1) == [0, 1] and node2 in {s["node"] for s in launch1}  # one per node
    assert sorted(s["rank"] for s in launch2) == [0, 1] and node2 not in {s["node"] for s in launch2}  # the head
    assert [json.loads(x)["epoch"] for x in (runs["lost"] / "epochs.jsonl").read_text().splitlines()] == [1, 2]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(tmp_path / 'lost' / 'mlflow.db').resolve()}")
    run_id = (runs["lost"] / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pcpp.restarts"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    a = torch.load(runs["lost"] / "final" / "model.pt", weights_only=True)
    b = torch.load(runs["straight"] / "final" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
