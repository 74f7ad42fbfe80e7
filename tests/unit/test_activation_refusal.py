"""A training run the activation guard refuses ends without raising (so Ray Train does not retry it), with
status `refused`, the guard's message, and its table on disk (stages.activations; new-user trial of issue 8)."""

from __future__ import annotations

import json

import engine_fixtures  # noqa: E402  (tests/unit on sys.path, pytest's rootdir-less import mode)
import pytest

shards, process_group = engine_fixtures.shards, engine_fixtures.process_group  # the fixtures these tests use

pytestmark = pytest.mark.unit


def run_with(shards, tmp_path, guard: str):
    from stages.config import TrainConfig, build
    from stages.training import TrainingRun

    train, test = shards
    cfg = build(TrainConfig, {
        "name": "guard", "init": "random", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 8, "epoch_length": 16, "eval_limit": 8},
        # 'none': every binarized conv sees its ReLU's output unshifted, all >= 0: the honest sign is +1
        "binarize": {"weight": "bnn", "activation": "bnn", "activation_placement": "none",
                     "activation_guard": guard},
        "algorithm": {"bn_recalibration_batches": 1},
        "optim": {"name": "sgd", "lr": 0.01, "epochs": 1},
        "distributed": {"num_workers": 1}, "tracking": {"run_root": str(tmp_path)}})
    (tmp_path / "run").mkdir()
    reports = []
    run = TrainingRun(cfg, tmp_path / "run", report=lambda metrics, checkpoint_dir=None: reports.append(metrics))
    return run, reports


def test_a_refused_run_ends_with_the_guards_message_and_table(shards, process_group, tmp_path):
    run, reports = run_with(shards, tmp_path, "error")
    assert run.run() == "refused"  # returns: nothing raised for Ray Train to retry
    assert run.message.startswith("refused by the activation guard: 18 of 18 binarized activations")
    assert "activation_guard=warn" in run.message  # and what to do
    table = (tmp_path / "run" / "activation_balance.txt").read_text()
    assert table.startswith("activation_placement: none")
    assert sum(line.endswith("<- one-sided") for line in table.splitlines()) == 18
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "refused" and result["message"] == run.message and result["epochs_done"] == 0
    assert not (tmp_path / "run" / "final" / "model.pt").exists()
    assert not (tmp_path / "run" / "epochs.jsonl").exists()
    assert len(reports) == 1 and reports[0]["refused"] == 1.0 and reports[0]["epoch"] == 1  # a Tune trial's end


def test_warn_runs_anyway_and_keeps_the_table(shards, process_group, tmp_path, capsys):
    run, _ = run_with(shards, tmp_path, "warn")
    assert run.run() == "finished"
    assert "warning: 18 of 18 binarized activations" in capsys.readouterr().out
    table = (tmp_path / "run" / "activation_balance.txt").read_text()
    assert sum(line.endswith("<- one-sided") for line in table.splitlines()) == 18
    assert (tmp_path / "run" / "final" / "model.pt").exists()
