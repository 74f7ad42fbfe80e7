"""Every listener stays on loopback, whatever the user exported (issue 13 item 1), and the CLI's failure paths.

`pcpp train` and `pcpp sweep` run as a new user runs them (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset) inside
a private network namespace that has, besides loopback, one address of its own on a veth pair and a
default route through it, so that "the machine's outward address" exists there and Ray would take it.
`ss -ltnp` is sampled while the command runs; every listening socket must be on 127.0.0.1 (or ::1, or
IPv4-mapped 127.0.0.1). No packet leaves the namespace: the veth peer is in it too.
The same runs check, at the CLI: relative paths and a relative MLFLOW_TRACKING_URI taken from the
directory the command runs in; a deleted MLflow run replaced with a notice; a resume with another ZeRO
stage refused; a sweep whose trials all fail leaves no MLflow run RUNNING.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration

PCPP = str(Path(sys.executable).with_name("pcpp"))
OUTWARD = "10.200.0.1"
NAMESPACE = ("ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add 10.200.0.1/24 dev v0 "
             "&& ip link set v1 up && ip link set v0 up && ip route add default via 10.200.0.2 dev v0")
# Runs the command, samples the listening TCP sockets (with their processes) until it exits.
SAMPLER = """
import json, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
with open(out + ".log", "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    samples = []
    while proc.poll() is None:
        samples.append(subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout)
        time.sleep(0.2)
json.dump({"rc": proc.returncode, "samples": samples}, open(out, "w"))
"""


def _namespace_unavailable() -> str | None:
    for tool in ("unshare", "ip", "ss"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    done = subprocess.run(["unshare", "-n", "sh", "-c", NAMESPACE], capture_output=True, text=True)
    if done.returncode:
        return f"cannot make a private network namespace here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
    return None


SKIP = _namespace_unavailable()
needs_namespace = pytest.mark.skipif(SKIP is not None, reason=f"loopback check skipped: {SKIP}")


def user_env(**extra) -> dict:
    """The environment of a plain shell: none of the variables make/pytest export for Ray."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def run_isolated(args: list[str], cwd: Path, env: dict, timeout: int = 900) -> tuple[int, str, list[tuple[str, str]]]:
    """(exit code, output, [(local address, process)] of every listener seen) of `pcpp ARGS` in a namespace."""
    (cwd / "sampler.py").write_text(SAMPLER)
    out = cwd / f"sample-{args[0]}-{len(list(cwd.glob('sample-*.json')))}.json"
    subprocess.run(["unshare", "-n", "sh", "-c", NAMESPACE + ' && exec "$@"', "sh", sys.executable,
                    str(cwd / "sampler.py"), str(out), PCPP, *args], cwd=cwd, env=env, timeout=timeout, check=True)
    result = json.loads(out.read_text())
    listeners = set()
    for sample in result["samples"]:
        for line in sample.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                name = re.search(r'\(\("([^"]+)"', line)
                listeners.add((fields[3].rsplit(":", 1)[0], name.group(1) if name else "?"))
    return result["rc"], Path(str(out) + ".log").read_text(), sorted(listeners)


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:  # "*": every interface
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def assert_loopback_only(listeners: list[tuple[str, str]], during: str) -> None:
    outside = [(a, p) for a, p in listeners if not is_loopback(a)]
    assert not outside, f"listening beyond loopback: {outside}"
    processes = {p for _, p in listeners}
    # The samples cover the run: Ray's core and a Ray Train worker (it lives only while training) were seen.
    assert "gcs_server" in processes and "raylet" in processes, processes
    assert any(p.startswith("ray::RayTrainWo") for p in processes), f"no Train worker seen during {during}"


@needs_namespace
def test_the_namespace_has_an_outward_address_that_ray_would_take(tmp_path):
    code = "from ray._private.services import node_ip_address_from_perspective as f; print(f())"
    done = subprocess.run(["unshare", "-n", "sh", "-c", NAMESPACE + ' && exec "$@"', "sh", sys.executable, "-c",
                           code], capture_output=True, text=True, env=user_env(), timeout=120)
    assert done.stdout.strip() == OUTWARD, done.stderr[-2000:]


def _link_shards(shards, cwd: Path) -> None:
    (cwd / "shards").mkdir()
    for split, path in zip(("train", "test"), shards):
        (cwd / "shards" / split).symlink_to(path)


@needs_namespace
def test_pcpp_train_listens_on_loopback_takes_paths_from_its_directory_and_replaces_a_deleted_run(tiny_shards,
                                                                                                  tmp_path):
    from mlflow import MlflowClient

    _link_shards(tiny_shards, tmp_path)
    (tmp_path / "train.yaml").write_text(
        "name: 1.10\ninit: random\nmodel: {name: resnet20, num_classes: 4}\n"
        "data: {train: shards/train, test: shards/test, batch_size: 32, epoch_length: 64, eval_limit: 40}\n"
        "binarize: {weight: bnn++}\noptim: {lr: 1e-2, epochs: 1}\ndistributed: {num_workers: 1, zero_stage: 1}\n"
        "tracking: {experiment: 2024, run_root: runs}\n")
    env = user_env(MLFLOW_TRACKING_URI="sqlite:///store/mlflow.db")  # relative: the caller's directory
    (tmp_path / "store").mkdir()
    args = ["train", "train.yaml", "--run-dir", "runs/one"]
    rc, log, listeners = run_isolated(args, tmp_path, env)
    assert rc == 0, log[-3000:]
    assert_loopback_only(listeners, "pcpp train")
    run_id = re.search(r"1\.10: finished 1 epochs: .* run dir (\S+); MLflow run (\w+)", log)
    assert run_id and run_id.group(1) == str(tmp_path / "runs" / "one"), log[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    first = client.get_run(run_id.group(2))
    assert first.info.status == "FINISHED" and first.data.params["data.train"] == str(tiny_shards[0])
    assert client.get_experiment(first.info.experiment_id).name == "2024" and first.data.tags["mlflow.runName"] \
        == "1.10"

    client.delete_run(first.info.run_id)  # as the UI's delete does
    rc, log, listeners = run_isolated(args, tmp_path, env)
    assert rc == 0, log[-3000:]
    assert_loopback_only(listeners, "the rerun")
    assert f"notice: MLflow run {first.info.run_id} of {tmp_path / 'runs' / 'one'} is deleted; logging to a new run" \
        in log
    second = client.get_run(re.search(r"1\.10: finished 1 epochs: .* MLflow run (\w+)", log).group(1))
    assert second.info.run_id != first.info.run_id and second.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(second.info.run_id, "binary_acc")] == [1]

    # The checkpoint was written with ZeRO-1 on one worker: a resume with ZeRO-0 is refused before Ray starts.
    done = subprocess.run([PCPP, "train", "train.yaml", "distributed.zero_stage=0", *args[2:]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"pcpp train: error: run dir {tmp_path / 'runs' / 'one'} holds a DeepSpeed checkpoint (epoch-0001) written "
        f"with ZeRO stage 1 on 1 worker(s); this run asks for ZeRO stage 0 on 1: rerun with distributed.zero_stage=1 "
        f"distributed.num_workers=1, or use another run directory")


@needs_namespace
def test_pcpp_sweep_listens_on_loopback_and_a_failed_sweep_leaves_no_run_running(tiny_shards, tmp_path):
    from mlflow import MlflowClient

    from pcpp import models

    _link_shards(tiny_shards, tmp_path)
    torch.save(models.create("resnet20", num_classes=4).state_dict(), tmp_path / "teacher.th")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "name": "nan", "root": "root", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": "shards/train", "test": "shards/test", "batch_size": 32, "epoch_length": 64,
                 "eval_limit": 40},
        "teacher": {"source": "file", "path": "teacher.th"},
        "binarize": {"weight": "fp", "scaling": "none"},  # full precision, sgd at lr >= 1e29: the loss is NaN
        "train": {"init": "teacher", "optim": {"name": "sgd", "lr_schedule": "constant", "epochs": 1}},
        "sensitivity": {"enabled": False}, "export": {"enabled": False},
        "distributed": {"num_workers": 1, "zero_stage": 1}, "tracking": {"experiment": "nan"}}))
    (tmp_path / "sweep.yaml").write_text("pipeline: pipeline.yaml\nsearch: {lr: {low: 1e29, high: 1e30, log: true}}\n"
                                         "num_samples: 2\nmax_concurrent_trials: 1\nepochs: 1\nmetric: loss\n"
                                         "mode: min\n")
    rc, log, listeners = run_isolated(["sweep", "sweep.yaml"], tmp_path, user_env())
    assert rc == 3, log[-3000:]
    assert_loopback_only(listeners, "pcpp sweep")
    assert re.search(r"sweep failed: no trial of sweep nan-sweep-\w+ finished \(2 trials\): diverged: "
                     r"non-finite loss", log), log[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    kinds = {r.data.tags.get("pcpp.kind") for r in runs}
    assert {"pipeline", "sweep"} <= kinds
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    (sweep_run,) = [r for r in runs if r.data.tags.get("pcpp.kind") == "sweep"]
    assert sweep_run.info.status == "FAILED" and "diverged" in sweep_run.data.tags["pcpp.message"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(trials) == 2
    assert {(r.info.status, r.data.tags["pcpp.status"]) for r in trials} == {("FAILED", "diverged")}
