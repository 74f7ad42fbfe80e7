"""Checks before a training run starts (issue 13 items 5 and 7) and MLflow runs replaced when deleted (issue 15.6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jpeg_shards import random_jpeg_shards

from stages.config import TrainConfig, build
from stages.preflight import check_batches, check_inputs, check_resume, checkpoint_layout

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(train, test): 20 real JPEGs each, 4 classes, 4 shards of 5."""
    return random_jpeg_shards(tmp_path_factory.mktemp("shards"), per_class=5, shard_size=5)


def config(shards, **data) -> TrainConfig:
    return build(TrainConfig, {"init": "random", "data": {"train": str(shards[0]), "test": str(shards[1]), **data}})


@pytest.mark.parametrize("data, world, needle", [
    ({"batch_size": 128}, 1, "data.train's 20 samples is fewer than one batch of data.batch_size 128"),
    ({"batch_size": 32, "epoch_length": 16}, 1, "data.epoch_length 16 is fewer than one batch of data.batch_size 32"),
    ({"batch_size": 24}, 2, "fewer than one batch of data.batch_size 24"),
    ({"batch_size": 9}, 2, "data.batch_size 9 does not split over 2 workers"),
    ({"batch_size": 8}, 8, "data.train has 4 shard(s) for 8 workers"),
    ({"batch_size": 4, "eval_limit": 1}, 2, "data.eval_limit 1 leaves some of the 2 workers without a test sample"),
])
def test_an_epoch_without_a_batch_is_refused_naming_both_sizes(shards, data, world, needle):
    with pytest.raises(ValueError) as err:
        check_batches(config(shards, **data), world)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("data, world", [({"batch_size": 20}, 1), ({"batch_size": 20}, 2),
                                          ({"batch_size": 8, "epoch_length": 8}, 4), ({"batch_size": 64,
                                                                                      "epoch_length": 64}, 1)])
def test_an_epoch_of_at_least_one_batch_passes(shards, data, world):
    check_batches(config(shards, **data), world)  # epoch_length beyond the set cycles through it


def test_missing_inputs_are_named(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train = '/nope' is not a shard directory"):
        check_inputs(build(TrainConfig, {"init": "random", "data": {"train": "/nope", "test": str(shards[1])}}))
    cfg = build(TrainConfig, {"init": "teacher", "teacher": str(tmp_path / "t.th"),
                              "data": {"train": str(shards[0]), "test": str(shards[1])}})
    with pytest.raises(FileNotFoundError, match=f"teacher: checkpoint {tmp_path / 't.th'} does not exist"):
        check_inputs(cfg)


def deepspeed_checkpoint(run_dir: Path, stage: int, world: int, tag: str = "epoch-0001") -> None:
    """The two fields DeepSpeed records in every checkpoint's mp_rank_00_model_states.pt."""
    (run_dir / "checkpoints" / tag).mkdir(parents=True)
    torch.save({"ds_config": {"zero_optimization": {"stage": stage}}, "dp_world_size": world, "module": {}},
               run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(tag)


def test_a_resume_with_another_zero_stage_or_world_size_is_refused(tmp_path):
    check_resume(tmp_path, {"zero_optimization": {"stage": 1}}, 1)  # nothing to resume
    deepspeed_checkpoint(tmp_path, stage=1, world=2)
    assert checkpoint_layout(tmp_path) == ("epoch-0001", 1, 2)
    check_resume(tmp_path, {"zero_optimization": {"stage": 1}}, 2)
    for ds, world, asked in (({"zero_optimization": {"stage": 0}}, 2, "ZeRO stage 0 on 2"), ({}, 2, "stage 0 on 2"),
                             ({"zero_optimization": {"stage": 1}}, 1, "ZeRO stage 1 on 1")):
        with pytest.raises(ValueError) as err:
            check_resume(tmp_path, ds, world)
        text = str(err.value)
        assert f"run dir {tmp_path} holds a DeepSpeed checkpoint (epoch-0001) written with ZeRO stage 1 on 2" in text
        assert asked in text and "distributed.zero_stage=1 distributed.num_workers=2" in text


# -- MLflow: a deleted or missing run is replaced (issue 15, item 6) ----------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating one takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def notices(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]


def test_a_deleted_or_missing_run_is_replaced_with_a_notice(tmp_path, capsys, store):
    from stages.tracking import start_training_run

    uri, client = store
    cfg = build(TrainConfig, {"init": "random", "tracking": {"run_root": str(tmp_path), "experiment": "e"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "epochs.jsonl").write_text(json.dumps({"epoch": 1, "loss": 2.0}) + "\n"
                                          + json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    first = start_training_run(cfg, run_dir, uri)
    assert start_training_run(cfg, run_dir, uri) == first  # resume: the same run
    assert notices(capsys) == []
    client.delete_run(first)
    second = start_training_run(cfg, run_dir, uri)
    assert second != first
    assert notices(capsys) == [f"notice: MLflow run {first} of {run_dir} is deleted; logging to a new run"]
    assert [(m.step, m.value) for m in client.get_metric_history(second, "loss")] == [(1, 2.0), (2, 1.0)]
    (run_dir / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")  # from another store
    third = start_training_run(cfg, run_dir, uri)
    assert third not in (first, second) and notices(capsys)[0].endswith("is missing; logging to a new run")
    assert client.get_run(third).info.status == "RUNNING"


def test_a_deleted_experiment_is_refused_with_how_to_restore_it(tmp_path, store):
    from stages.tracking import experiment_id

    _, client = store
    exp = experiment_id(client, "gone", tmp_path / "art")
    client.delete_experiment(exp)
    with pytest.raises(ValueError, match=rf"experiment 'gone' \(id {exp}\) was deleted: restore it \(mlflow "
                                         rf"experiments restore --experiment-id {exp}\)"):
        experiment_id(client, "gone", tmp_path / "art")


def test_pcpp_train_refuses_an_epoch_without_a_batch_before_ray(shards, tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "c.yaml").write_text(f"init: random\ndata: {{train: {shards[0]}, test: {shards[1]}, "
                                     f"batch_size: 128}}\ntracking: {{run_root: {tmp_path / 'runs'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == ("pcpp train: error: an epoch would train on no batch: data.train's 20 samples is fewer than one "
                   "batch of data.batch_size 128 (the last partial batch is dropped): use data.batch_size <= 20 or "
                   "more samples\n")
    assert not (tmp_path / "runs").exists()
