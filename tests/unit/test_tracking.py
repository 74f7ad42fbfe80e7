"""stages.tracking: the fused-kernel path a training run used, as MLflow tags (on a real SQLite store)."""

from __future__ import annotations

import pytest

from pcpp import kernels
from stages.config import TrainConfig, build

pytestmark = pytest.mark.unit


def test_a_training_run_records_its_kernel_path_and_compile_failures(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from stages.tracking import Run, start_training_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    cfg = build(TrainConfig, {"init": "random", "tracking": {"run_root": str(tmp_path), "experiment": "k"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with kernels.using("reference"):
        run_id = start_training_run(cfg, run_dir, uri)  # the driver's path, which its workers get
    tags = client.get_run(run_id).data.tags
    assert tags["pcpp.kernels"] == "reference" and "pcpp.kernels.compile_failures" not in tags
    run = Run(uri, run_id)
    with kernels.using("eager"):
        run.log_epoch({"loss": 1.5}, 1)  # rank 0, every epoch: the path it ran on
    tags = client.get_run(run_id).data.tags
    assert tags["pcpp.kernels"] == "eager" and "pcpp.kernels.compile_failures" not in tags
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.5)]
    # kernels.run's record of a failed compile (what it falls back on); pcpp state, not a mock of torch
    monkeypatch.setitem(kernels._broken, "cpu", "InductorError: no C++ compiler")
    with kernels.using("auto"):
        run.log_epoch({"loss": 1.0}, 2)
    tags = client.get_run(run_id).data.tags
    assert tags["pcpp.kernels"] == "auto"
    assert tags["pcpp.kernels.compile_failures"] == "cpu: InductorError: no C++ compiler"
