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
        "train": {"init": "teacher", "optim": {"epochs": 2, "lr": 0.005}},
        "sensitivity": {"enabled": False}, "export": {"enabled": False},
        "distributed": {"num_workers": 1, "zero_stage": 1},
        "tracking": {"experiment": "tiny"},
    }


def test_sweep_asha_stops_trials_nests_runs_and_writes_a_runnable_best_config(tiny_shards, local_ray, tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(tiny_pipeline(tiny_shards, tmp_path / "root")))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "pipeline": str(tmp_path / "pipeline.yaml"),
        # Narrow mu ranges and a wide lr range: lr decides the first epoch's loss. Seed 82 draws lr 5.3e-6 for
        # trial 0 and 0.07 for trial 1 (then 2.5e-3, 1.5e-4). Adam at 0.07 throws the binarized teacher far off
        # in its first epoch (a mean loss several times that of 5e-6, which barely moves it; measured: 3.2e-3
        # already doubles it), so ASHA stops trial 1 at rung 1 whatever the noise.
        "search": {"mu0": {"low": 4, "high": 5}, "muT": {"low": 20, "high": 25},
                   "lr": {"low": 1e-6, "high": 0.1, "log": True}},
        # One trial at a time: ASHA compares each trial with those before it, in the grid's order, so which
        # trials it stops does not depend on which of two concurrent trials reports first.
        "num_samples": 4, "max_concurrent_trials": 1, "epochs": 2, "metric": "loss", "mode": "min",
        "scheduler": {"grace_period": 1, "reduction_factor": 2}, "seed": 82,
    }))
    cfg, base = load_sweep(tmp_path / "sweep.yaml")
    result = sweep(cfg, base)
    print(result.trials)
    assert [t["sample"] for t in result.trials] == [0, 1, 2, 3]
    assert all(t["error"] is None for t in result.trials), result.trials
    assert result.trials[0]["values"]["lr"] == pytest.approx(5.3e-6, rel=0.05)
    assert result.trials[1]["values"]["lr"] == pytest.approx(0.07, rel=0.05)
    assert result.trials[1]["status"] == "stopped", result.trials  # lr 0.07 loses to lr 5e-6 at rung 1
    assert result.stopped_early >= 1, result.trials
    assert result.trials[0]["status"] == "finished"  # the first trial has nobody to be compared with

    client = MlflowClient(f"sqlite:///{(tmp_path / 'root').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(nested) == 4
    # Each trial's MLflow status is the one Tune's outcome gives it, set by the sweep's driver after Tune
    # returned (the trials never set it): no race between a stopped trial's teardown and the marking.
    by_sample = {int(r.data.tags["pcpp.sample"]): r for r in nested}
    for t in result.trials:
        run = by_sample[t["sample"]]
        stopped = t["epochs"] < cfg.epochs
        assert t["status"] == ("stopped" if stopped else "finished")
        assert run.info.status == ("KILLED" if stopped else "FINISHED"), (t, run.info.status, run.data.tags)
        assert run.data.tags["pcpp.status"] == t["status"]
        assert run.data.tags["pcpp.stopped_early"] == str(stopped).lower()
        assert run.data.tags["pcpp.epochs_done"] == str(t["epochs"])
        assert "pcpp.message" not in run.data.tags
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"

    best = load_pipeline(result.best_yaml)  # `pcpp run` accepts it
    assert best.binarize.weight["mu"]["start"] == pytest.approx(result.best_values["mu0"])
    assert best.train.optim.lr == pytest.approx(result.best_values["lr"])
    assert result.best_values == next(t["values"] for t in result.trials if t["metric"] == result.best_metric)
