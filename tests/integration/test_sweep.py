"""`pcpp sweep`: Ray Tune + ASHA over the schedules and lr, nested MLflow runs, a best-config YAML."""

from __future__ import annotations

import pytest
import yaml

from pipelines.config import load_pipeline
from pipelines.sweep import load_sweep, sweep

pytestmark = pytest.mark.integration


def tiny_pipeline(shards, root) -> dict:
    train, test = shards
    return {
        "name": "tiny", "root": str(root), "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 320},
        "teacher": {"source": "train", "epochs": 1, "lr": 0.01},
        "binarize": {"weight": "bnn++"},
        "train": {"pipeline": "ft", "optim": {"epochs": 2, "lr": 0.005}},
        "sensitivity": {"enabled": False}, "export": {"enabled": False},
        "distributed": {"num_workers": 1, "zero_stage": 1},
        "tracking": {"experiment": "tiny"},
    }


def test_sweep_asha_stops_trials_nests_runs_and_writes_a_runnable_best_config(tiny_shards, local_ray, tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(tiny_pipeline(tiny_shards, tmp_path / "root")))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "pipeline": str(tmp_path / "pipeline.yaml"),
        "search": {"mu0": {"low": 2, "high": 10}, "muT": {"low": 20, "high": 60},
                   "lr": {"low": 1e-5, "high": 0.05, "log": True}},
        "num_samples": 4, "max_concurrent_trials": 2, "epochs": 2, "metric": "loss", "mode": "min",
        "scheduler": {"grace_period": 1, "reduction_factor": 2}, "seed": 3,
    }))
    cfg, base = load_sweep(tmp_path / "sweep.yaml")
    result = sweep(cfg, base)
    print(result.trials)
    assert len(result.trials) == 4
    assert all(t["error"] is None for t in result.trials), result.trials
    assert result.stopped_early >= 1, result.trials

    client = MlflowClient(f"sqlite:///{(tmp_path / 'root').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(nested) == 4
    assert {r.info.status for r in nested} <= {"FINISHED", "KILLED"}
    assert sum(r.data.tags.get("pcpp.status") == "stopped_early" for r in nested) == result.stopped_early

    best = load_pipeline(result.best_yaml)  # `pcpp run` accepts it
    assert best.binarize.weight["mu"]["start"] == pytest.approx(result.best_values["mu0"])
    assert best.train.optim.lr == pytest.approx(result.best_values["lr"])


def test_sweep_config_errors(tmp_path):
    bad = {"pipeline": "x.yaml", "search": {"momentum": {"low": 0, "high": 1}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="valid: mu0, muT, rho0, rhoT, lr"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"pipeline": "x.yaml", "search": {"lr": {"low": 1, "high": 0}}}))
    with pytest.raises(ValueError, match="low < high"):
        load_sweep(tmp_path / "s.yaml")
