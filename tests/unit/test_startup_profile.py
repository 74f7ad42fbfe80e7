"""Where a training run's time goes (issue 11 item 2): the phase timer and its table, `--profile-startup`, and the
driver's model check on the meta device (the workers alone build the real student)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from jpeg_shards import random_jpeg_shards

from pipelines.cli import build_parser, print_profile
from stages import profile
from stages.config import TrainConfig, build
from stages.preflight import check_model, meta_model
from stages.profile import EPOCHS, PhaseTimer, format_table
from stages.training import build_model

pytestmark = pytest.mark.unit

TEACHER = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data" / "resnet20-cifar10.th"


class Clock:
    """time.perf_counter stand-in: each reading advances by the next step (seconds)."""

    def __init__(self, *steps: float):
        self.now, self.steps = 0.0, list(steps)

    def __call__(self) -> float:
        self.now += self.steps.pop(0) if self.steps else 0.0
        return self.now


def test_phases_sum_their_repeats_and_keep_the_order_first_seen(monkeypatch):
    monkeypatch.setattr(profile.time, "perf_counter", Clock(0.0, 0.0, 2.0, 0.0, 3.0, 0.0, 5.0, 7.0, 11.0))
    timer = PhaseTimer()  # reads 0
    with timer.phase("b"):  # 0 -> 2
        pass
    with timer.phase("a"):  # 2 -> 5
        pass
    with timer.phase("b"):  # 5 -> 10
        pass
    timer.mark("c")  # 7 s since phase b ended
    timer.mark()  # 11 s dropped
    timer.add("d", -1.0)  # a negative span (clocks of two processes) counts as 0
    assert timer.seconds == {"b": 7.0, "a": 3.0, "c": 7.0, "d": 0.0}


def test_a_nested_phase_is_listed_under_the_phase_it_runs_in(monkeypatch):
    monkeypatch.setattr(profile.time, "perf_counter", Clock(0.0, 1.0, 1.0, 2.0, 1.0, 2.0, 3.0))
    timer = PhaseTimer()
    with timer.phase("epochs"):  # 1 -> 2
        pass
    with timer.phase("evaluation"):  # 4 -> 10, the BatchNorm re-estimation inside it 5 -> 7
        with timer.phase("  of which BatchNorm re-estimation"):
            pass
    assert list(timer.seconds) == ["epochs", "evaluation", "  of which BatchNorm re-estimation"]
    assert timer.seconds == {"epochs": 1.0, "evaluation": 6.0, "  of which BatchNorm re-estimation": 2.0}


def test_a_phase_that_raises_is_still_timed(monkeypatch):
    monkeypatch.setattr(profile.time, "perf_counter", Clock(0.0, 1.0, 4.0))
    timer = PhaseTimer()
    with pytest.raises(RuntimeError), timer.phase("x"):
        raise RuntimeError("boom")
    assert timer.seconds == {"x": 4.0}


def test_the_table_shows_every_phase_the_untimed_rest_and_the_fixed_cost():
    phases = {"Ray start": 3.0, EPOCHS: 4.0, "evaluation": 1.5, "  of which BatchNorm re-estimation": 1.0}
    lines = format_table(phases, wall=10.0, epochs=4.0).splitlines()
    rows = {m[1].strip(): m[2].split() for m in (re.match(r"^(.*?)((?:\s+-?[\d.]+)+)$", line) for line in lines[1:])}
    assert lines[0].split() == ["phase", "seconds", "%", "wall"]
    assert rows["Ray start"] == ["3.00", "30.0"]
    assert rows["of which BatchNorm re-estimation"] == ["1.00", "10.0"]
    assert rows["not timed"] == ["1.50", "15.0"]  # the nested row is not counted twice
    assert rows["wall"] == ["10.00"] and rows["fixed cost (wall - epochs)"] == ["6.00"]
    assert rows["wall / epochs"] == ["2.50"]
    refused = format_table({"Ray start": 3.0}, wall=10.0, epochs=0.0).splitlines()  # no epoch ran (refused)
    assert refused[-1].split()[-1] == "n/a"


def test_profile_startup_parses_and_prints_the_table(capsys):
    assert build_parser().parse_args(["train", "c.yaml", "x.y=1", "--profile-startup"]).profile_startup
    assert not build_parser().parse_args(["train", "c.yaml"]).profile_startup
    timer = PhaseTimer()
    timer.add(EPOCHS, 1.0)
    print_profile(timer)  # Ray is not running here: its shutdown is timed all the same
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "phase"
    assert [line.split()[0] for line in out[1:4]] == ["epochs", "Ray", "not"]
    assert out[-1].startswith("wall / epochs")


# -- the student is built on the meta device on the driver ------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(train, test): 8 real JPEGs each, 4 classes, one shard."""
    return random_jpeg_shards(tmp_path_factory.mktemp("shards"), per_class=2, shard_size=8)


def ft_config(shards, **over) -> TrainConfig:
    data = {"init": "teacher", "teacher": str(TEACHER), "data": {"train": str(shards[0]), "test": str(shards[1]),
                                                                 "batch_size": 4}}
    for key, value in over.items():
        section, _, name = key.partition(".")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[key] = value
    return build(TrainConfig, data)


def test_the_meta_student_has_the_real_students_names_and_shapes_and_no_storage(shards):
    cfg = ft_config(shards, **{"binarize.activation": "bnn++", "binarize.accumulator_bits": 8})
    (meta, rule), (real, real_rule) = meta_model(cfg), build_model(cfg)
    assert type(rule) is type(real_rule)
    tensors = {**dict(meta.named_parameters()), **dict(meta.named_buffers())}
    assert tensors and all(t.is_meta for t in tensors.values())
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in real.state_dict().items()}


@pytest.mark.parametrize("over, needle", [
    ({"model.num_classes": 100}, "linear.weight: checkpoint (10, 64) vs model (100, 64)"),
    ({"binarize.include": ["nothing*"]}, "pattern 'nothing*' matches no module of CifarResNet"),
    ({"model.name": "resnet21"}, "unknown model 'resnet21'"),
    ({"model.kwargs": {"depth": 3}}, "model 'resnet20' takes no extra arguments, got ['depth']"),
])
def test_a_student_that_does_not_build_is_refused_with_the_workers_own_error(shards, over, needle):
    cfg = ft_config(shards, **over)
    with pytest.raises(ValueError) as real:
        build_model(cfg)
    with pytest.raises(ValueError) as checked:
        check_model(cfg)
    assert str(checked.value) == str(real.value) and needle in str(real.value)


def test_pcpp_train_builds_the_student_on_the_meta_device_only(shards, tmp_path, monkeypatch, capsys):
    """The driver's checks run to the end (a resume refused after the model check) without a real model."""
    from pcpp import models
    from pipelines.cli import main

    built = []

    def create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        built.append({t.device.type for t in model.state_dict().values()})
        return model

    real_create = models.create
    monkeypatch.setattr(models, "create", create)
    run_dir = tmp_path / "run"
    tag = run_dir / "checkpoints" / "epoch-0001"
    tag.mkdir(parents=True)  # a checkpoint of ZeRO-0 on two workers: refused after the model check
    torch.save({"ds_config": {"zero_optimization": {"stage": 0}}, "dp_world_size": 2, "module": {}},
               tag / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text("epoch-0001")
    (tmp_path / "c.yaml").write_text(json.dumps({
        "init": "teacher", "teacher": str(TEACHER), "data": {"train": str(shards[0]), "test": str(shards[1]),
                                                             "batch_size": 4},
        "tracking": {"run_root": str(tmp_path / "runs")}}))
    assert main(["train", str(tmp_path / "c.yaml"), "--run-dir", str(run_dir)]) == 2
    assert "written with ZeRO stage 0 on 2 worker(s)" in capsys.readouterr().err
    assert built == [{"meta"}]
