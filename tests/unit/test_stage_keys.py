"""Stage keys hash exactly the config a stage receives: a changed field changes the keys of exactly the
stages that read it, and no other (a stage whose key ignored a field it reads would serve a stale artifact).

Parametrized over the stage registry: every leaf of every stage's config changes its key; over every leaf
of the pipeline config: the stages whose key changes are those listed in READERS, and READERS covers every
leaf (a new field fails here until its readers are written down).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest

from pipelines.config import PipelineConfig
from stages import registry
from stages.artifact import Artifact, stage_key
from stages.config import DistributedConfig, TrainConfig, build

RUNTIME_KEYS = [f.name for f in dataclasses.fields(DistributedConfig) if f.metadata.get("runtime")]

pytestmark = pytest.mark.unit

BASE = {
    "name": "keys", "root": "runs/keys", "model": {"name": "resnet20", "num_classes": 10},
    "data": {"train": "src/train", "test": "src/test"},
    "teacher": {"source": "file", "path": "teacher.th"},
    "binarize": {"weight": "bnn++", "activation": "bnn"},  # BWA: activation_placement / _guard count
    "pretrain": {"enabled": True},
    # pq has a rule parameter, so that train.algorithm.params can change to another valid value
    "train": {"algorithm": {"rule": "pq", "params": {"rho": {"kind": "linear", "start": 0.01, "end": 10.0}}}},
    "sensitivity": {"enabled": True}, "export": {"enabled": True},
    "frontier": {"enabled": True, "keep": [0, 1]},  # K <= 1: the one block of CHANGED["sensitivity.blocks"]
}
TRAINING = {"pretrain", "train"}
# the frontier trains the train stage's recipe (its TrainConfig) and exports with the export stage's config
RECIPE = {*TRAINING, "frontier"}
MODEL = {"teacher", *RECIPE}
# pipeline leaf -> the stages whose own config holds it (teacher.source: file)
READERS = {
    "name": set(), "root": set(),  # the run's, not a stage's: artifacts are shared across pipeline names
    "model.name": MODEL, "model.kwargs": MODEL, "model.num_classes": MODEL,
    "data.train": {"data"}, "data.test": {"data"}, "data.shard_size": {"data"},
    "data.batch_size": RECIPE, "data.num_workers": RECIPE, "data.epoch_length": RECIPE,
    "data.eval_limit": {"teacher", "export", *RECIPE},
    "teacher.source": {"teacher"}, "teacher.path": {"teacher"}, "teacher.uri": {"teacher"},
    "teacher.epochs": set(), "teacher.lr": set(),  # read only when the teacher is trained (below)
    "pretrain.enabled": set(), "pretrain.epochs": {"pretrain"}, "pretrain.lr": {"pretrain"},
    "train.seed": RECIPE, "train.init": {"train", "frontier"},
    "train.algorithm.bn_recalibration_batches": RECIPE,
    # which stages run, not what they compute
    "sensitivity.enabled": set(), "export.enabled": set(), "frontier.enabled": set(),
    "export.precision": {"export", "frontier"},
    "tracking.experiment": set(), "tracking.tracking_uri": set(),  # the run's MLflow store, given as context
    # How a training run is carried out (stages.config.RUNTIME: checkpoint storage, restarts, placement): not
    # what it computes, so neither TrainConfig.digest() (a `pcpp train` run directory) nor a stage key
    # (stages.artifact.config_dict) hashes them: a relaunch with another storage path resumes the same work.
    **{f"distributed.{k}": set() for k in RUNTIME_KEYS},
}
# new values for leaves whose type does not give one (a choice among names, a spec); a tuple: the first
# alternative that differs from the current value
CHANGED = {
    "model.name": "resnet18", "teacher.source": "timm", "teacher.uri": "runs:/0123/model",
    "binarize.weight": "bnn", "binarize.activation": "bnn++", "binarize.scaling": "channel", "binarize.units": "raw",
    "binarize.accumulator_bits": 8, "binarize.include": ["layer1.*"], "binarize.exclude": ["layer3.*"],
    "binarize.activation_placement": "threshold", "binarize.activation_guard": "warn",
    "train.init": ("random", "teacher"), "train.algorithm.rule": "rpc",
    "train.algorithm.params": {"rho": {"kind": "linear", "start": 0.1, "end": 5.0}},
    "train.optim.name": "sgd", "train.optim.lr_schedule": "constant",
    "sensitivity.weight": "bnn", "sensitivity.activation": "bnn++", "sensitivity.scaling": "channel",
    "sensitivity.blocks": ["layer1.0"], "distributed.deepspeed": "v100", "distributed.zero_stage": 2,
    "distributed.placement_strategy": "SPREAD", "distributed.storage_path": "s3://bucket/checkpoints",
    "tracking.tracking_uri": "sqlite:///x.db", "export.precision": "fp16",
    "binarize.keep_fp": ["layer1.0"], "frontier.keep": [1], "frontier.budget_bytes": [50000],
    "frontier.budget_ratio": [10.0], "frontier.by": "drop_bat",
}


def _readers() -> dict[str, set[str]]:
    """READERS, plus the sections read as a whole: binarize and distributed by the training stages (and the
    frontier), the rest of train (algorithm, optim, distill) by the train stage (and the frontier), the rest
    of sensitivity by the scan, the rest of frontier (its points) by the frontier."""
    whole = {"binarize": RECIPE, "distributed": RECIPE, "train": {"train", "frontier"},
             "sensitivity": {"sensitivity"}, "frontier": {"frontier"}}
    out = dict(READERS)
    for path, _, _ in leaves(_base()):
        if path not in out and path.split(".")[0] in whole:
            out[path] = whole[path.split(".")[0]]
    return out


def _base(**sections) -> PipelineConfig:
    data = copy.deepcopy(BASE)
    data.update(sections)
    return build(PipelineConfig, data)


def leaves(obj, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, value, annotation) of every leaf of a config dataclass; dicts, lists and None are leaves."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value, hints[f.name]))
    return out


def changed(path: str, value, annotation=None):
    """Another valid value for the leaf at `path` (a pipeline path, or a stage config's: `training.model.name`
    and `source` match CHANGED's `model.name` and `teacher.source` by their path inside the section)."""
    inside = path.split(".", 1)[-1]  # training.optim.name -> optim.name
    for matches in (lambda k: k == path, lambda k: k.split(".", 1)[-1] == path,
                    lambda k: inside in (k, k.split(".", 1)[-1])):
        for k, v in CHANGED.items():
            if matches(k):
                return next(a for a in v if a != value) if isinstance(v, tuple) else v
    if value is None:  # the annotation says what the field holds
        args = typing.get_args(annotation)
        return 7 if int in args else "changed" if str in args else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.25
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, dict):
        return {**value, "changed": 1}
    raise AssertionError(f"no changed value for {path} = {value!r}: add one to CHANGED")


def with_leaf(cfg, path: str, value):
    """A copy of the config dataclass `cfg` with the leaf at `path` replaced (validated by its type)."""
    data = dataclasses.asdict(cfg)
    node = data
    *parents, leaf = path.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    return build(type(cfg), data)


def artifact(stage: str, key: str = "k0") -> Artifact:
    return Artifact(Path(stage), {"stage": stage, "key": key, "files": {"model.pt": "0" * 64}})


def keys(pc: PipelineConfig) -> dict[str, str]:
    configs = pc.stage_configs()
    out = {}
    for name in registry.names():
        stage = registry.get(name)
        inputs = {i: artifact(i) for i in (*stage.inputs, *stage.optional_inputs)}
        out[name] = stage_key(name, configs[name], inputs)
    return out


TEACHERS = {"file": {"source": "file", "path": "teacher.th"}, "train": {"source": "train", "epochs": 1, "lr": 0.01}}
TIED = {"source"}  # a trained teacher's source goes with its training config: varied with a file teacher


@pytest.mark.parametrize("teacher", sorted(TEACHERS))
@pytest.mark.parametrize("name", registry.names())
def test_every_field_of_a_stage_config_is_in_its_key(name, teacher):
    stage = registry.get(name)
    pc = _base(teacher=TEACHERS[teacher])  # with a trained teacher, the teacher's TrainConfig too
    cfg = pc.stage_config(name)
    assert isinstance(cfg, stage.config)
    inputs = {i: artifact(i) for i in stage.inputs}
    key = stage_key(name, cfg, inputs)
    assert key == stage_key(name, copy.deepcopy(cfg), inputs)  # equal configs, equal keys
    checked = 0
    for path, value, annotation in leaves(cfg):
        new_value = changed(path, value, annotation)
        if new_value is None or (teacher == "train" and path in TIED):  # nothing else valid to vary it to
            continue
        if path.split(".")[-1] in RUNTIME_KEYS:  # how the run is carried out: not in any key (READERS)
            assert stage_key(name, with_leaf(cfg, path, new_value), inputs) == key, f"{name}: {path} is in its key"
            continue
        assert stage_key(name, with_leaf(cfg, path, new_value), inputs) != key, f"{name}: {path} is not in its key"
        checked += 1
    assert checked >= len(dataclasses.fields(cfg)) - 1
    for i in stage.inputs:  # and every input's digest
        other = {**inputs, i: artifact(i, key="k1")}
        assert stage_key(name, cfg, other) != key, f"{name}: input {i} is not in its key"


def test_the_readers_table_covers_every_field_of_the_pipeline_config():
    paths = {p for p, _, _ in leaves(_base())}
    assert set(_readers()) == paths, f"missing: {paths - set(_readers())}, extra: {set(_readers()) - paths}"


def _change(pc: PipelineConfig, path: str) -> PipelineConfig:
    value, annotation = {p: (v, a) for p, v, a in leaves(pc)}[path]
    return with_leaf(pc, path, changed(path, value, annotation))


# fields whose other value the config refuses unless another section changes too: that section, changed in the base
TIED_SECTIONS = {"sensitivity.enabled": {"frontier": {"enabled": False}}}  # the frontier reads the scan


@pytest.mark.parametrize("path", sorted(p for p, _, _ in leaves(_base())))
def test_a_pipeline_field_changes_exactly_the_keys_of_the_stages_that_read_it(path):
    base = _base(**TIED_SECTIONS.get(path, {}))
    before = keys(base)
    after = keys(_change(base, path))
    assert {s for s in before if before[s] != after[s]} == _readers()[path]


def test_a_trained_teacher_reads_its_epochs_lr_and_the_training_sections():
    base = _base(teacher={"source": "train", "epochs": 1, "lr": 0.01})
    before = keys(base)
    for path in ("teacher.epochs", "teacher.lr", "data.batch_size", "distributed.num_workers"):
        after = keys(_change(base, path))
        assert after["teacher"] != before["teacher"], path
    after = keys(with_leaf(base, "binarize.weight", "bnn"))  # the teacher stays full precision
    assert after["teacher"] == before["teacher"]


def test_which_stages_run_follows_the_enabled_flags():
    assert _base().enabled() == registry.names()
    off = _base(pretrain={"enabled": False}, sensitivity={"enabled": False, "weight": "bnn++"},
                frontier={"enabled": False})
    assert off.enabled() == ["data", "teacher", "train", "export"]


def test_runtime_settings_leave_the_run_directory_of_pcpp_train_alone():
    """A relaunch with another storage path, failure budget or placement finds the same run directory."""
    assert RUNTIME_KEYS == ["storage_path", "max_failures", "checkpoints_to_keep", "placement_strategy"]
    cfg = build(TrainConfig, {"init": "random"})
    for key in RUNTIME_KEYS:
        other = with_leaf(cfg, f"distributed.{key}", changed(f"distributed.{key}", getattr(cfg.distributed, key)))
        assert other != cfg and other.digest() == cfg.digest(), key
    assert with_leaf(cfg, "distributed.num_workers", 2).digest() != cfg.digest()


@pytest.mark.parametrize("bat_steps", [0, 10])
def test_a_new_default_activation_schedule_is_a_new_sensitivity_key(monkeypatch, bat_steps):
    """The scan's own weight / activation specs hash as they resolve, as a binarize spec's do: BAT trains under
    the default schedule, so a new registered default is a new artifact, and the same schedule spelled out is
    the same one."""
    from pcpp import specs
    from pcpp.schedules import loglinear
    from stages.sensitivity import SensitivityConfig

    def key(cfg):
        return stage_key("sensitivity", cfg, {})

    cfg = SensitivityConfig(activation="bnn++", bat_steps=bat_steps)
    weights_only = SensitivityConfig(weight="bnn++", bat_steps=bat_steps)
    before, before_weights = key(cfg), key(weights_only)
    monkeypatch.setitem(specs.ACTIVATION_SCHEDULES, "bnn++", {"mu": loglinear(0.5, 20.0)})
    implicit = key(cfg)
    assert implicit != before
    assert key(weights_only) == before_weights  # weights resolve in their own role: not an activation default
    spelled = {"name": "bnn++", "mu": {"kind": "loglinear", "start": 0.5, "end": 20.0}}
    assert key(SensitivityConfig(activation=spelled, bat_steps=bat_steps)) == implicit
