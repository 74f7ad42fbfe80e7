"""The teacher stage on its own typed config: the checkpoint from a file and from an MLflow model URI give the
same model and the same accuracy; bad sources are refused naming the valid ones."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from pcpp import models
from stages import teacher
from stages.artifact import StageContext, commit
from stages.config import ModelConfig
from stages.schema import build
from stages.teacher import TeacherConfig

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data"
TEACHER = DEMO / "resnet20-cifar10.th"


@pytest.fixture(scope="module")
def data_artifact(tmp_path_factory):
    """A data artifact with 20 test images (2 per class) of the repository's CIFAR-10 sample."""
    from stages.data import prepare

    root = tmp_path_factory.mktemp("teacher-stage")
    out = root / "out-data"
    prepare(DEMO / "cifar10-test-1000.tar.gz", out / "test", shard_size=20, limit_per_class=2, progress=False)
    return commit(root, "data", "d0", {}, {}, out, {}, time.time()), root


def test_from_a_file_and_from_mlflow_the_same_teacher(data_artifact, tmp_path, monkeypatch):
    import mlflow.pytorch

    art, root = data_artifact
    file_cfg = TeacherConfig(source="file", path=str(TEACHER), model=ModelConfig(name="resnet20"))
    (tmp_path / "file").mkdir()
    by_file = teacher.run(file_cfg, {"data": art}, tmp_path / "file", StageContext(root=root))
    assert 0.0 <= by_file["accuracy"] <= 1.0
    assert {p.name for p in (tmp_path / "file").iterdir()} >= {"model.pt"}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where log_model writes; the stage is told `uri` itself
    exp = mlflow.create_experiment("teachers", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.pytorch.log_model(models.create("resnet20", pretrained_file=TEACHER), name="model",
                                 serialization_format="pickle")  # a whole nn.Module, as runs log them
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow_cfg = TeacherConfig(source="mlflow", uri=f"runs:/{run.info.run_id}/model",
                               model=ModelConfig(name="resnet20"))
    (tmp_path / "mlflow").mkdir()
    by_mlflow = teacher.run(mlflow_cfg, {"data": art}, tmp_path / "mlflow", StageContext(root=root, tracking_uri=uri))
    assert by_mlflow == by_file
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the stage looked in `uri` without changing the process's store
    a, b = (torch.load(tmp_path / d / "model.pt") for d in ("file", "mlflow"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("data, needle", [
    ({"source": "hub"}, "valid: file, mlflow, timm, train"),
    ({"source": "file"}, "needs teacher.path"),
    ({"source": "mlflow"}, "needs teacher.uri"),
    ({"source": "train"}, "go together"),  # a trained teacher comes with its TrainConfig
])
def test_bad_teacher_configs_are_refused(data, needle):
    with pytest.raises(ValueError, match=needle):
        build(TeacherConfig, data)
