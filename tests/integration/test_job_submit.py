"""The pipeline as users run it on a cluster: `ray job submit -- pcpp run CONFIG` against a loopback head.

One head for the module. A first submission is stopped during training; the resubmission resumes from
the last epoch checkpoint and finishes every stage (artifacts and MLflow child runs); a third
submission finds every stage in the cache and takes a fraction of the time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.head import client_env, free_port, start_head, stop_head

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PCPP = Path(sys.executable).with_name("pcpp")
STAGES = ["data", "teacher", "pretrain", "train", "sensitivity", "export"]


@pytest.fixture(scope="module")
def head():
    address = start_head(num_cpus=4, dashboard_port=free_port())
    try:
        yield address
    finally:
        stop_head(address)


def _ray(address, *args, check=True) -> str:
    env = {**os.environ, **client_env(address)}
    done = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise AssertionError(f"ray job {args[0]} failed: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def submit(address, config: Path, root: Path) -> str:
    out = _ray(address, "submit", "--no-wait", "--working-dir", ".", "--", str(PCPP), "run", str(config),
               f"root={root}")
    return re.search(r"raysubmit_\w+", out).group(0)


def _client(address):
    from ray.job_submission import JobSubmissionClient

    from cluster.head import auth_headers

    return JobSubmissionClient(address, headers=auth_headers())


def logs(address, job_id) -> str:
    return _client(address).get_job_logs(job_id)[-4000:]


def wait_for(address, job_id, wanted: set[str], timeout: float = 600) -> str:
    client = _client(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = str(client.get_job_status(job_id).value)
        if s in wanted:
            return s
        if s in {"FAILED", "STOPPED", "SUCCEEDED"}:
            raise AssertionError(f"job {job_id} ended {s}, wanted {wanted}:\n{logs(address, job_id)}")
        time.sleep(2)
    raise AssertionError(f"job {job_id} not {wanted} after {timeout} s")


def train_history(root: Path) -> list[int]:
    files = list((root / "work").glob("train-*/run/epochs.jsonl"))
    if not files:
        return []
    return [json.loads(line)["epoch"] for line in files[0].read_text().splitlines()]


def test_submit_stop_resume_and_cache(head, tiny_shards, tmp_path):
    from mlflow import MlflowClient

    train, test = tiny_shards
    root = tmp_path / "root"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-job", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 320},
        "teacher": {"source": "train", "epochs": 1, "lr": 0.01},
        "binarize": {"weight": "bnn++"},
        "pretrain": {"enabled": True, "epochs": 1, "lr": 0.005},
        "train": {"init": "teacher", "optim": {"epochs": 3, "lr": 0.005}},
        "sensitivity": {"enabled": True, "eval_limit": 40},
        "export": {"enabled": True},
        "distributed": {"num_workers": 1, "zero_stage": 1},
        "tracking": {"experiment": "tiny-job"},
    }))

    # 1. Stop the job once the training stage has checkpointed its first epoch.
    first = submit(head, config, root)
    client = _client(head)
    deadline = time.time() + 600
    while not train_history(root):
        assert time.time() < deadline and str(client.get_job_status(first).value) in {"PENDING", "RUNNING"}, \
            logs(head, first)
        time.sleep(1)
    client.stop_job(first)
    wait_for(head, first, {"STOPPED"})
    time.sleep(10)  # a training run left behind would report another epoch by now
    stopped_at = train_history(root)
    assert stopped_at and stopped_at[0] == 1 and len(stopped_at) < 3, stopped_at

    # 2. Resubmit: finished stages are cache hits, training resumes after its last checkpoint.
    t0 = time.time()
    second = submit(head, config, root)
    wait_for(head, second, {"SUCCEEDED"})
    full_seconds = time.time() - t0
    assert train_history(root) == [1, 2, 3]  # no epoch trained twice
    summary = json.loads((root / "summary.json").read_text())
    assert [i["stage"] for i in summary["info"]] == STAGES
    for stage in STAGES:
        art = Path(summary["artifacts"][stage])
        assert (art / "manifest.json").exists(), stage
    assert {i["stage"] for i in summary["info"] if i["cached"]} >= {"data", "teacher", "pretrain"}
    export_dir = Path(summary["artifacts"]["export"])
    assert (export_dir / "model.safetensors").exists() and (export_dir / "size_summary.txt").exists()
    sens_dir = Path(summary["artifacts"]["sensitivity"])
    assert (sens_dir / "sensitivity.csv").exists() and (sens_dir / "sensitivity.png").exists()

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = summary["run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.data.tags["pcpp.stage"] for r in children if "pcpp.stage" in r.data.tags} == set(STAGES)
    # The training run resumed its own MLflow run (nested under the stopped job's parent), now finished.
    runs = client.search_runs([client.get_run(parent).info.experiment_id], "tags.`pcpp.status` = 'finished'")
    assert any(r.data.tags.get("pcpp.rule") == "pc++" and r.data.tags.get("mlflow.parentRunId") for r in runs)

    # 3. Resubmit again: every stage is a cache hit.
    t0 = time.time()
    third = submit(head, config, root)
    wait_for(head, third, {"SUCCEEDED"})
    cached_seconds = time.time() - t0
    summary = json.loads((root / "summary.json").read_text())
    assert all(i["cached"] for i in summary["info"]), summary["info"]
    print(f"resumed run {full_seconds:.1f} s, all cached {cached_seconds:.1f} s")
    assert cached_seconds < 0.6 * full_seconds
