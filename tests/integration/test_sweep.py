"""`pcpp sweep`: Ray Tune + ASHA over dotted config paths (grid, choice, a conditional), nested MLflow runs,
a best-config YAML and a trials summary."""

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
        # Narrow mu ranges and a grid over lr: lr decides the first epoch's loss. The grid gives lr 5.3e-6 to
        # trials 0 and 2 and 0.07 to trials 1 and 3 (num_samples 2 x the grid, in the grid's order). Adam at
        # 0.07 throws the binarized teacher far off in its first epoch (a mean loss several times that of
        # 5e-6, which barely moves it; measured: 3.2e-3 already doubles it), so ASHA stops trial 1 at rung 1
        # whatever the noise. mu.start depends on mu.kind (one case: the conditional path end to end).
        "search": {"binarize.weight.mu.kind": {"choice": ["loglinear"]},
                   "binarize.weight.mu.start": {"depends_on": "binarize.weight.mu.kind",
                                                "cases": {"loglinear": {"uniform": [4, 5]}}},
                   "binarize.weight.mu.end": {"uniform": [20, 25]},
                   "train.optim.lr": {"grid": [5.3e-6, 0.07]}},
        # One trial at a time: ASHA compares each trial with those before it, in Tune's order, so which
        # trials it stops does not depend on which of two concurrent trials reports first.
        "num_samples": 2, "max_concurrent_trials": 1, "epochs": 2, "metric": "loss", "mode": "min",
        "scheduler": {"grace_period": 1, "reduction_factor": 2}, "searcher": "random", "seed": 82,
    }))
    cfg, base = load_sweep(tmp_path / "sweep.yaml")
    result = sweep(cfg, base)
    print(result.trials)
    assert [t["sample"] for t in result.trials] == [0, 1, 2, 3]
    assert all(t["error"] is None for t in result.trials), result.trials
    assert [t["values"]["train.optim.lr"] for t in result.trials] == [5.3e-6, 0.07, 5.3e-6, 0.07]
    assert all(4 <= t["values"]["binarize.weight.mu.start"] <= 5 for t in result.trials), result.trials
    assert all(t["values"]["binarize.weight.mu.kind"] == "loglinear" for t in result.trials)
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
        # the sampled values are the trial's config, so its MLflow params (and pcpp.search.* tags)
        assert float(run.data.params["binarize.weight.mu.start"]) == pytest.approx(
            t["values"]["binarize.weight.mu.start"])
        assert float(run.data.params["optim.lr"]) == pytest.approx(t["values"]["train.optim.lr"])
        assert run.data.tags["pcpp.search.binarize.weight.mu.kind"] == "loglinear"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"

    best = load_pipeline(result.best_yaml)  # `pcpp run` accepts it: the spec in its mapping form
    mu = best.binarize.weight["mu"]
    assert (mu["kind"], mu["start"], mu["end"]) == ("loglinear", pytest.approx(
        result.best_values["binarize.weight.mu.start"]), pytest.approx(result.best_values["binarize.weight.mu.end"]))
    assert best.train.optim.lr == pytest.approx(result.best_values["train.optim.lr"])
    summary = yaml.safe_load(result.best_yaml.with_name(result.best_yaml.name.replace("-best", "-trials")).read_text())
    assert summary["best"] == result.best_values and len(summary["trials"]) == 4
    assert result.best_values == next(t["values"] for t in result.trials if t["metric"] == result.best_metric)

    # The same sweep again resumes its Tune experiment: finished there, so nothing trains, the same trials and
    # figures come back, logged to the same MLflow parent run (a crashed sweep continues the same way).
    trained = {f: f.stat().st_mtime_ns for f in (tmp_path / "root" / "sweeps").glob("*/*/epochs.jsonl")}
    assert len(trained) == 4
    again = sweep(*load_sweep(tmp_path / "sweep.yaml"))
    assert {f: f.stat().st_mtime_ns for f in trained} == trained  # no trial trained again
    assert again.parent_run_id == result.parent_run_id
    same = ("trial_id", "status", "metric", "epochs", "values")
    assert [[t[k] for k in same] for t in again.trials] == [[t[k] for k in same] for t in result.trials]
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")) == 4
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
