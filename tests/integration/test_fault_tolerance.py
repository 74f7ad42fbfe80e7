"""Fault tolerance through Ray Train: a worker SIGKILLed mid-epoch is restarted by Ray from the last reported
checkpoint, and a relaunched `pcpp train` continues its run from the storage path; either way the run ends
`finished` with every epoch logged once and the same final weights as an uninterrupted run.

The kill is deterministic: the test hook PCPP_TEST_FAULT (stages.storage) makes rank 1 SIGKILL itself at a
given step of a given epoch, once (a marker file records it), so no outcome depends on timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.config import TrainConfig, build
from stages.engine import fit
from stages.storage import FAULT_ENV, checkpoint_dir_name, ray_run_name, starts

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 2, 10  # 320 samples per epoch in global batches of 32 (16 per worker)
KILL_AT = {"rank": 1, "epoch": 2, "step": 4}  # mid-epoch 2: epoch 1 is the last reported checkpoint


def two_worker_config(shards, run_root, **distributed) -> TrainConfig:
    train, test = shards
    return build(TrainConfig, {
        "name": "ft2", "seed": 0, "init": "random", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 32 * STEPS,
                 "eval_limit": 40},
        "binarize": {"weight": "bnn++"}, "optim": {"name": "adam", "lr": 0.01, "epochs": EPOCHS},
        "distributed": {"num_workers": 2, "zero_stage": 1, **distributed},
        "tracking": {"run_root": str(run_root), "experiment": "faults"}})


def weights(run_dir) -> dict:
    return torch.load(Path(run_dir) / "final" / "model.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def logged_epochs(run_dir) -> list[int]:
    return [json.loads(x)["epoch"] for x in (Path(run_dir) / "epochs.jsonl").read_text().splitlines()]


def mlflow_run(root: Path, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    return client, client.get_run(run_id)


@pytest.fixture(scope="module")
def reference(tiny_shards, local_ray, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to (and its wall time)."""
    root = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    result = fit(two_worker_config(tiny_shards, root), run_dir=root / "straight")
    assert result.ok, result.message
    print(f"uninterrupted: {time.monotonic() - t0:.1f} s")
    return result, time.monotonic() - t0


def test_a_worker_killed_mid_epoch_is_restarted_by_ray_and_the_run_finishes(reference, tiny_shards, tmp_path,
                                                                             monkeypatch):
    straight, straight_s = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, json.dumps({**KILL_AT, "marker": str(marker)}))
    cfg = two_worker_config(tiny_shards, tmp_path)
    t0 = time.monotonic()
    result = fit(cfg, run_dir=tmp_path / "run")
    wall = time.monotonic() - t0
    print(f"with a SIGKILL of rank 1 at epoch {KILL_AT['epoch']} step {KILL_AT['step']}: {wall:.1f} s "
          f"(uninterrupted {straight_s:.1f} s, restart cost {wall - straight_s:.1f} s)")
    assert marker.exists()  # the kill happened, once
    assert result.ok, result.message
    assert result.restarts == 1 and result.epochs_done == EPOCHS
    # the restarted group resumed after epoch 1, not from scratch
    assert [s["start_epoch"] for s in starts(tmp_path / "run") if s["rank"] == 0] == [0, 1]
    assert logged_epochs(tmp_path / "run") == [1, 2]
    client, run = mlflow_run(tmp_path, result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pcpp.status"] == "finished"
    assert run.data.tags["pcpp.restarts"] == "1"
    for key in ("loss", "binary_acc", "w_mu"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2], key
    assert_same_weights(weights(result.run_dir), weights(straight.run_dir))
    # Ray keeps checkpoints_to_keep (2) epochs in the storage path under the run directory
    ckpts = sorted(p.name for p in (tmp_path / "run" / "ray" / ray_run_name(cfg, tmp_path / "run")).glob("epoch-*"))
    assert ckpts == [checkpoint_dir_name(1), checkpoint_dir_name(2)]


def pcpp_train(config: Path, cwd: Path, *overrides: str, fault: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULT_ENV)}
    if fault:
        env[FAULT_ENV] = json.dumps(fault)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "train", str(config), *overrides], cwd=cwd,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)


def test_a_relaunched_pcpp_train_continues_the_run_from_the_storage_path(reference, tiny_shards, tmp_path):
    straight, _ = reference
    storage = tmp_path / "shared-storage"  # outside the run root, as a shared mount would be
    cfg = two_worker_config(tiny_shards, tmp_path / "runs", storage_path=str(storage))
    config = tmp_path / "ft2.yaml"
    config.write_text(cfg.to_yaml())
    marker = tmp_path / "killed"
    t0 = time.monotonic()
    first = pcpp_train(config, tmp_path, "distributed.max_failures=0", fault={**KILL_AT, "marker": str(marker)})
    first_s = time.monotonic() - t0
    assert first.returncode == 3 and marker.exists(), first.stdout + first.stderr  # failed: no restart allowed
    run_dir = tmp_path / "runs" / "train" / f"{cfg.name}-{cfg.digest()}"
    assert logged_epochs(run_dir) == [1]
    assert (storage / ray_run_name(cfg, run_dir) / checkpoint_dir_name(1)).is_dir()
    assert not (run_dir / "checkpoints").exists()  # the checkpoint lives in the storage path only
    t0 = time.monotonic()
    second = pcpp_train(config, tmp_path)  # the same command, the same config and storage path
    print(f"relaunch: first launch {first_s:.1f} s (killed), second {time.monotonic() - t0:.1f} s")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "finished 2 epochs" in second.stdout
    assert [s["start_epoch"] for s in starts(run_dir) if s["rank"] == 0] == [0, 1]  # continued after epoch 1
    assert logged_epochs(run_dir) == [1, 2]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client, run = mlflow_run(tmp_path / "runs", run_id)  # the same MLflow run, every epoch once
    assert run.info.status == "FINISHED" and run.data.tags["pcpp.restarts"] == "0"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert_same_weights(weights(run_dir), weights(straight.run_dir))


def test_a_sweep_trial_whose_worker_is_killed_is_restarted_inside_the_trial(tiny_shards, local_ray, tmp_path,
                                                                            monkeypatch):
    import yaml

    from pipelines.sweep import load_sweep, sweep

    train, test = tiny_shards
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "name": "ftsweep", "root": str(tmp_path / "root"), "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 320, "eval_limit": 40},
        "teacher": {"source": "train", "epochs": 1, "lr": 0.01}, "binarize": {"weight": "bnn++"},
        "train": {"init": "teacher", "optim": {"epochs": 2, "lr": 0.005}},
        "sensitivity": {"enabled": False}, "export": {"enabled": False},
        "distributed": {"num_workers": 1, "zero_stage": 1}, "tracking": {"experiment": "ftsweep"}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "pipeline": str(tmp_path / "pipeline.yaml"), "search": {"lr": {"low": 1e-4, "high": 1e-3, "log": True}},
        "num_samples": 1, "max_concurrent_trials": 1, "epochs": 2, "metric": "loss", "mode": "min"}))
    marker = tmp_path / "killed"
    # the trial's only worker (rank 0) dies at epoch 2, step 4; the teacher stage trains 1 epoch: never hit
    monkeypatch.setenv(FAULT_ENV, json.dumps({"rank": 0, "epoch": 2, "step": 4, "marker": str(marker)}))
    result = sweep(*load_sweep(tmp_path / "sweep.yaml"))
    (trial,) = result.trials
    assert marker.exists()
    assert trial["status"] == "finished" and trial["epochs"] == 2 and trial["error"] is None, trial
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(tmp_path / 'root').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ftsweep")
    (run,) = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert run.data.tags["pcpp.restarts"] == "1" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
