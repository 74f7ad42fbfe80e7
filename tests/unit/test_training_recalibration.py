"""The training engine re-estimates the BatchNorm statistics under the honest forward before each honest
evaluation (stages.training.TrainingRun.recalibrate_bn), and what it evaluates is what it saves."""

from __future__ import annotations

import copy
import json
from itertools import islice

import engine_fixtures  # noqa: E402  (tests/unit on sys.path, pytest's rootdir-less import mode)
import pytest
import torch

from pcpp.calibration import recalibrate_batchnorm_
from pcpp.evaluation import accuracy
from pcpp.layers import binary_layers

shards, process_group = engine_fixtures.shards, engine_fixtures.process_group  # the fixtures these tests use

pytestmark = pytest.mark.unit


def bn_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def make_run(shards, tmp_path, batches: int, accumulator_bits=None):
    from stages.config import TrainConfig, build
    from stages.training import TrainingRun

    train, test = shards
    cfg = build(TrainConfig, {
        "name": "recal", "init": "random", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 8, "epoch_length": 24},
        "binarize": {"weight": "bnn++", "activation": "bnn++", "accumulator_bits": accumulator_bits},
        "algorithm": {"bn_recalibration_batches": batches},
        "optim": {"name": "sgd", "lr": 0.05, "epochs": 1},
        "distributed": {"num_workers": 1}, "tracking": {"run_root": str(tmp_path)}})
    (tmp_path / "run").mkdir()
    run = TrainingRun(cfg, tmp_path / "run")
    run.setup()
    return run


def test_the_saved_network_is_the_recalibrated_one_it_evaluated(shards, process_group, tmp_path):
    run = make_run(shards, tmp_path, batches=2, accumulator_bits=8)  # BWAA: overflow counters too
    run.train()
    run.cleanup()
    assert run.status == "finished"
    norms = [m for m in run.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {int(m.num_batches_tracked) for m in norms} == {2}  # the 2 recalibration batches, not the steps
    counters = [(m.overflow_count.clone(), m.accumulator_count.clone()) for _, m in binary_layers(run.module)]
    assert sum(int(a) for _, a in counters) > 0
    run.recalibrate_bn()  # the epoch's overflow rate counts training steps only
    assert all(torch.equal(m.overflow_count, o) and torch.equal(m.accumulator_count, a)
               for (_, m), (o, a) in zip(binary_layers(run.module), counters))
    run.evaluate()  # nor the test-set forwards of the epoch's evaluation (epoch_metrics reads the rate after it)
    assert all(torch.equal(m.overflow_count, o) and torch.equal(m.accumulator_count, a)
               for (_, m), (o, a) in zip(binary_layers(run.module), counters))
    final = torch.load(tmp_path / "run" / "final" / "model.pt", weights_only=True)
    saved = {k: v for k, v in final.items() if k.endswith(("running_mean", "running_var"))}
    assert saved
    # the saved statistics are those of the honest forward over the epoch's first 2 training batches
    fresh = copy.deepcopy(run.module)
    for m in fresh.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    run.train_loader.set_epoch(0)
    recalibrate_batchnorm_(fresh, list(islice(iter(run.train_loader), 2)))
    for k, v in bn_stats(fresh).items():
        torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # and the reported honest accuracy is the saved network's
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["metrics"]["binary_acc"] == accuracy(fresh, run.test_loader, honest=True)


def test_zero_batches_keeps_the_training_statistics(shards, process_group, tmp_path):
    run = make_run(shards, tmp_path, batches=0)
    assert run.recalibrate_bn() == 0
    run.train()
    norms = [m for m in run.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {int(m.num_batches_tracked) for m in norms} == {run.step}  # training's own statistics
    trained = bn_stats(run.module)
    run.train_loader.set_epoch(0)
    recalibrate_batchnorm_(run.module, list(islice(iter(run.train_loader), 2)))
    assert any(not torch.allclose(trained[k], v) for k, v in bn_stats(run.module).items())


def test_bad_batch_count_is_refused_by_name():
    from stages.config import AlgorithmConfig

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="bn_recalibration_batches must be an integer >= 0"):
            AlgorithmConfig(bn_recalibration_batches=bad)
