"""The training engine calls update rules only through their interface (pcpp.rules), never by name.

A rule registered here, and known to nothing else, runs through the real engine (stages.training's
TrainingRun: DeepSpeed ZeRO-1 on CPU over gloo, as the integration tests run it, here in this process,
without Ray): its after_step reaches the weights at every step, at the engine's progress, and the change
reaches DeepSpeed's fp32 master copies (otherwise each step would start again from the masters and only
the last step's change would remain).
"""

from __future__ import annotations

from typing import ClassVar

import engine_fixtures  # noqa: E402  (tests/unit on sys.path, pytest's rootdir-less import mode)
import pytest
import torch

from pcpp import layers
from pcpp.rules import RULES, UpdateRule, register
from pcpp.schedules import progress_at

shards, process_group = engine_fixtures.shards, engine_fixtures.process_group  # the fixtures these tests use

pytestmark = pytest.mark.unit

SHIFT = 0.25  # what the dummy rule adds to every binarized latent weight after each step


class ShiftAfterStep(UpdateRule):
    """A rule no engine code knows by name: w <- w + SHIFT after every step, recording the progress."""

    name = "test-shift-after-step"
    progress_seen: ClassVar[list[float]] = []

    def after_step(self, params, progress, scale_of=None):
        type(self).progress_seen.append(progress)
        with torch.no_grad():
            for p in params:
                p.add_(SHIFT)


@pytest.fixture
def shift_rule():
    register(ShiftAfterStep)
    ShiftAfterStep.progress_seen.clear()
    yield ShiftAfterStep
    RULES.unregister(ShiftAfterStep.name)


def test_engine_applies_a_new_rules_after_step(shards, shift_rule, process_group, tmp_path):
    from stages.config import TrainConfig, build
    from stages.training import TrainingRun

    train, test = shards
    cfg = build(TrainConfig, {
        "name": "hooks", "init": "random", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 8, "epoch_length": 16},
        "binarize": {"weight": "bnn++"}, "algorithm": {"rule": shift_rule.name},
        "optim": {"name": "sgd", "lr": 1e-6, "momentum": 0.0, "epochs": 2},
        "distributed": {"num_workers": 1, "zero_stage": 1}, "tracking": {"run_root": str(tmp_path)}})
    run = TrainingRun(cfg, tmp_path / "run")
    (tmp_path / "run").mkdir()
    run.setup()
    assert run.engine.zero_optimization_stage() == 1
    before = {n: p.detach().clone() for n, p in run.module.named_parameters()}
    binarized = {f"{n}.weight" for n, _ in layers.binary_layers(run.module)}
    assert binarized and "conv1.weight" not in binarized  # the stem stays full precision

    run.train()
    run.cleanup()

    steps = 2 * (16 // 8)
    assert run.status == "finished" and run.step == steps
    assert shift_rule.progress_seen == [progress_at(i, steps) for i in range(steps)]
    final = torch.load(tmp_path / "run" / "final" / "model.pt", weights_only=True)
    for name, p in run.module.named_parameters():
        moved = p.detach() - before[name]
        torch.testing.assert_close(final[name], p.detach(), rtol=0, atol=0)
        if name in binarized:  # every step's shift stayed: it reached the fp32 masters DeepSpeed steps
            torch.testing.assert_close(moved, torch.full_like(moved, steps * SHIFT), rtol=0, atol=1e-4, msg=name)
        else:  # the rule touches the binarized latents only; lr 1e-6 barely moves the rest
            assert moved.abs().max() < 1e-4, name
