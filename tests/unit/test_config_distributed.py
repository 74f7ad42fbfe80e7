"""distributed.storage_path / max_failures / checkpoints_to_keep / placement_strategy: typed, checked with
the bad value named, paths made absolute; the storage helpers a relaunch and the restart count rely on."""

from __future__ import annotations

import json

import pytest

from stages.config import TrainConfig, absolute, build
from stages.storage import (
    FAULT_ENV,
    STATE,
    Fault,
    checkpoint_dir_name,
    fault_spec,
    ray_run_name,
    record_start,
    restarts,
    storage_root,
    stored_state,
)

pytestmark = pytest.mark.unit


def cfg(**distributed) -> TrainConfig:
    return build(TrainConfig, {"init": "random", "distributed": distributed})


def test_defaults():
    d = cfg().distributed
    assert (d.storage_path, d.max_failures, d.checkpoints_to_keep, d.placement_strategy) == (None, 2, 2, "PACK")


@pytest.mark.parametrize("key, value, needle", [
    ("max_failures", -2, "distributed.max_failures must be -1 (no limit), 0 (no restart) or more, got -2"),
    ("checkpoints_to_keep", 0, "distributed.checkpoints_to_keep must be >= 1 (a resume needs the last one), got 0"),
    ("placement_strategy", "spread", "unknown distributed.placement_strategy 'spread'; valid: PACK, SPREAD"),
    ("storage_path", "ftp://host/x", "distributed.storage_path 'ftp://host/x' is neither a path nor a URI"),
    ("storage_path", "s3:/bucket/x", "distributed.storage_path 's3:/bucket/x' is neither a path nor a URI"),
    ("storage_path", "s3:bucket", "distributed.storage_path 's3:bucket' is neither a path nor a URI"),
    ("max_failures", "many", "distributed.max_failures: expected an integer"),
])
def test_a_bad_value_is_refused_naming_it(key, value, needle):
    with pytest.raises(ValueError) as err:
        cfg(**{key: value})
    assert needle in str(err.value)


def test_storage_path_a_relative_path_becomes_absolute_a_uri_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute(cfg(storage_path="ckpt")).distributed.storage_path == str(tmp_path / "ckpt")
    assert absolute(cfg(storage_path="s3://bucket/pcpp")).distributed.storage_path == "s3://bucket/pcpp"
    assert absolute(cfg(max_failures=-1)).distributed.max_failures == -1


def test_storage_root_and_a_run_name_stable_per_run_directory(tmp_path):
    c = cfg()
    assert storage_root(c, tmp_path / "run") == str(tmp_path / "run" / "ray")
    assert storage_root(cfg(storage_path="s3://b/p"), tmp_path) == "s3://b/p"
    assert ray_run_name(c, tmp_path / "run") == ray_run_name(c, tmp_path / "x" / ".." / "run")
    assert ray_run_name(c, tmp_path / "run") != ray_run_name(c, tmp_path / "other")


def test_stored_state_is_the_newest_complete_checkpoint(tmp_path):
    assert stored_state(str(tmp_path), "r") is None
    for epoch, complete in ((1, True), (2, True), (3, False)):  # epoch 3: an upload that never finished
        d = tmp_path / "r" / checkpoint_dir_name(epoch) / "checkpoints"
        d.mkdir(parents=True)
        if complete:
            (d / STATE).write_text(json.dumps({"epoch": epoch, "zero_stage": 1, "world_size": 2}))
    assert stored_state(str(tmp_path), "r")["epoch"] == 2
    with pytest.raises(ValueError, match="distributed.storage_path 'nofs://x' cannot be read"):
        stored_state("nofs://x", "r")


def test_restarts_count_rank_zero_starts_per_launch(tmp_path):
    for launch, n in (("a", 3), ("b", 1)):
        for _ in range(n):
            record_start(tmp_path, launch, 0, "node", 0)
            record_start(tmp_path, launch, 1, "node", 0)
    assert restarts(tmp_path, "a") == 2 and restarts(tmp_path, "b") == 0 and restarts(tmp_path) == 2


def test_the_fault_hook_is_checked_and_targets_one_worker(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_spec() is None
    monkeypatch.setenv(FAULT_ENV, json.dumps({"epoch": 1, "step": 0}))
    with pytest.raises(ValueError, match="needs epoch, step, marker, rank or node_id"):
        fault_spec()
    spec = {"rank": 1, "epoch": 2, "step": 3, "marker": str(tmp_path / "m")}
    monkeypatch.setenv(FAULT_ENV, json.dumps(spec))
    assert fault_spec() == spec
    assert Fault(spec, rank=0, node=None).spec is None  # another rank: never fires
    Fault(spec, rank=1, node=None).at(0, 3)  # another epoch: nothing happens
    (tmp_path / "m").write_text("1")
    Fault(spec, rank=1, node=None).at(1, 3)  # the marker exists: it already happened once


def test_keyed_dict_is_asdict_without_the_runtime_fields():
    import dataclasses

    from pcpp.specs import make_quantizer
    from stages.config import keyed_dict

    c = cfg(storage_path="s3://b/p", max_failures=5)
    expected = dataclasses.asdict(c)
    for key in ("storage_path", "max_failures", "checkpoints_to_keep", "placement_strategy"):
        expected["distributed"].pop(key)
    # the binarize spec's quantizers as they resolve, so that a new default schedule is a new key
    expected["binarize"]["weight"] = make_quantizer(c.binarize.weight).state()
    assert c.binarize.activation is None and expected["binarize"]["activation"] is None
    # an empty keep_fp (omit_empty) is left out: keys made before the field existed stay valid
    assert expected["binarize"].pop("keep_fp") == []
    assert keyed_dict(c) == expected and c.digest() == cfg().digest()
    kept = cfg()
    kept.binarize.keep_fp = ["layer1.0"]
    assert keyed_dict(kept)["binarize"]["keep_fp"] == ["layer1.0"] and kept.digest() != c.digest()


def test_a_new_default_schedule_is_a_new_run_directory(monkeypatch):
    from pcpp import specs
    from pcpp.schedules import loglinear

    c = cfg()
    c.binarize.activation = "bnn++"
    before = c.digest()
    monkeypatch.setitem(specs.ACTIVATION_SCHEDULES, "bnn++", {"mu": loglinear(0.5, 20.0)})
    implicit = c.digest()
    assert implicit != before
    c.binarize.activation = {"name": "bnn++", "mu": {"kind": "loglinear", "start": 0.5, "end": 20.0}}
    assert c.digest() == implicit  # the same schedule, spelled out, is the same run


def test_a_relaunch_naming_another_storage_path_is_refused_while_the_first_holds_the_run(tmp_path):
    """Another storage path would start the run over from epoch 0: refused, naming both, until the first
    holds no checkpoint of the run (then the new one is taken)."""
    from stages.storage import STATE, STORAGE_MARK, check_storage_unchanged

    run_dir, first, second = tmp_path / "run", str(tmp_path / "a"), str(tmp_path / "b")
    run_dir.mkdir()
    check_storage_unchanged(run_dir, second, "r")  # a new run: nothing recorded
    (run_dir / STORAGE_MARK).write_text(first)
    check_storage_unchanged(run_dir, second, "r")  # recorded, but no checkpoint there yet
    ckpt = tmp_path / "a" / "r" / "epoch-0001" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / STATE).write_text(json.dumps({"epoch": 1, "step": 3, "tag": "epoch-0001", "zero_stage": 1,
                                         "world_size": 1, "history": []}))
    check_storage_unchanged(run_dir, first, "r")  # the same path: fine
    with pytest.raises(ValueError) as err:
        check_storage_unchanged(run_dir, second, "r")
    message = str(err.value)
    assert first in message and second in message and "set distributed.storage_path back" in message
