"""Cluster plumbing: ray_cluster.yaml passes Ray's own checks, the local scripts, a loopback head."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.head import (
    client_env,
    dashboard_version,
    free_port,
    ray_executable,
    running_heads,
    start_head,
    stop_head,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / "cluster" / "start_local.sh", REPO / "cluster" / "stop_local.sh"]


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def prepared(config: dict) -> dict:
    """What `ray up` checks before it contacts AWS (commands._bootstrap_config): defaults, then the schema.

    prepare_config merges the AWS defaults.yaml (offline) and the setup commands; validate_config checks
    the result against ray/autoscaler/ray-schema.json plus the node-type rules (head type declared, sum of
    min_workers within max_workers). Nothing here imports boto3 or needs credentials.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validation(cluster_config):
    config = prepared(cluster_config)
    assert "boto3" not in sys.modules  # nothing went near AWS
    assert config["cluster_name"] == "pcpp" and config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2" and config["provider"]["cache_stopped_nodes"] is True
    assert config["auth"]["ssh_user"] == "ubuntu"
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert [w["node_config"]["InstanceType"] for w in workers.values()] == ["p3.8xlarge"]
    (worker,) = workers.values()
    assert worker["resources"] == {"CPU": 32, "GPU": 4}
    assert (worker["min_workers"], worker["max_workers"]) == (0, 4)
    assert config["file_mounts"] == {"~/pcpp": "."}
    # a Volta-capable torch before pcpp, pcpp without the torch pin, then DeepSpeed against that torch
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c and "whl/cu118" in c)
    pcpp_at = next(i for i, c in enumerate(setup) if "-e ~/pcpp" in c)
    ds_at = next(i for i, c in enumerate(setup) if "--no-build-isolation" in c and "deepspeed" in c)
    assert torch_at < pcpp_at < ds_at and "--no-deps" in setup[pcpp_at]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--disable-usage-stats" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--disable-usage-stats" in " ".join(config["worker_start_ray_commands"])
    # the same merged commands `ray up` runs on the head
    assert config["head_setup_commands"][: len(setup)] == setup


def test_cluster_yaml_validation_is_not_vacuous(cluster_config):
    import jsonschema

    bad = copy.deepcopy(cluster_config)
    bad["available_node_types"]["ray.worker.p3_8xlarge"]["gpus"] = 4  # not a node-type field
    with pytest.raises(jsonschema.ValidationError):
        prepared(bad)
    bad = copy.deepcopy(cluster_config)
    bad["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(bad)


def test_cluster_yaml_commands_are_valid_bash(cluster_config):
    keys = ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in cluster_config[key]:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {cmd}\n{r.stderr}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_local_scripts(script):
    assert script.exists() and os.access(script, os.X_OK), f"{script} is not executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    if script.name == "start_local.sh":
        for flag in ("--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                     "--disable-usage-stats", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"):
            assert flag in text
        assert "export RAY_ADDRESS=http://127.0.0.1:$PORT" in text


def session_processes(session_id: int) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session_id:
                pids.append(p.pid)
        except OSError:
            continue
    return pids


@pytest.fixture
def loopback_head():
    """A head on free loopback ports, stopped whatever happens in the test (or in start_head)."""
    before = {h.dashboard for h in running_heads()}
    try:
        yield start_head(num_cpus=2, dashboard_port=free_port())
    finally:
        for head in running_heads():
            if head.dashboard not in before:
                stop_head(head.dashboard)


def test_start_and_stop_head(loopback_head):
    import ray

    t0 = time.monotonic()
    address = loopback_head
    (head,) = [h for h in running_heads() if h.dashboard == address]
    assert address.startswith("http://127.0.0.1:")
    assert dashboard_version(address)["ray_version"] == ray.__version__

    env = {**os.environ, **client_env(address)}
    assert env["RAY_ADDRESS"] == address and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    deadline = time.monotonic() + 30
    while True:  # the autoscaler's first report comes a few seconds after the dashboard is up
        r = subprocess.run([ray_executable(), "status", "--address", head.gcs_address], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        if "/2.0 CPU" in r.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "/2.0 CPU" in r.stdout, r.stdout  # the head's num_cpus
    assert session_processes(head.session_id)

    stop_head(address)
    assert dashboard_version(address) is None
    assert not Path(head.temp_dir).exists()
    assert session_processes(head.session_id) == []
    assert address not in [h.dashboard for h in running_heads()]
    print(f"status + stop: {time.monotonic() - t0:.1f} s")
