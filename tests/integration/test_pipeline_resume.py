"""A crashed pipeline resumes: finished stages are cache hits, training continues after its checkpoint."""

from __future__ import annotations

import json

import pytest

from pipelines.config import PipelineConfig
from pipelines.runner import PipelineFailed, run
from stages.config import build

pytestmark = pytest.mark.integration


def test_crashed_pipeline_resumes_from_the_last_checkpoint(tiny_shards, local_ray, tmp_path):
    train, test = tiny_shards
    pc = build(PipelineConfig, {
        "name": "tiny-resume", "root": str(tmp_path / "root"), "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 320},
        "teacher": {"source": "train", "epochs": 1, "lr": 0.01},
        "binarize": {"weight": "bnn++"},
        "train": {"init": "teacher", "optim": {"epochs": 2, "lr": 0.005}},
        "sensitivity": {"enabled": False}, "export": {"enabled": True},
        "distributed": {"num_workers": 1, "zero_stage": 1}, "tracking": {"experiment": "tiny-resume"},
    })
    with pytest.raises(PipelineFailed, match="injected failure after epoch 1"):
        run(pc, inject_failure={"train": 1})
    root = pc.root_path
    assert sorted(p.name.split("-")[0] for p in (root / "artifacts").iterdir() if not p.name.startswith(".")) \
        == ["data", "teacher"]
    history = next((root / "work").glob("train-*/run/epochs.jsonl"))
    assert [json.loads(x)["epoch"] for x in history.read_text().splitlines()] == [1]

    result = run(pc)
    info = {i["stage"]: i for i in result.info}
    assert info["data"]["cached"] and info["teacher"]["cached"]
    assert not info["train"]["cached"] and not info["export"]["cached"]
    assert [json.loads(x)["epoch"] for x in history.read_text().splitlines()] == [1, 2]  # epoch 1 not redone
    assert result.artifacts["export"].metrics["round_trip_exact"] == 1.0
