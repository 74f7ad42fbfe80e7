"""Sensitivity stage on the real ResNet-20 teacher and a 200-image slice of the JPEG CIFAR-10 test set
(the first 20 images of each class: the repository's demo sample holds them)."""

import csv
import shutil
import time
from pathlib import Path

import pytest
import torch

from pcpp import models
from stages import sensitivity
from stages.artifact import StageContext, commit
from stages.common import save_model
from stages.schema import build
from stages.sensitivity import SensitivityConfig

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data"
TEACHER = DEMO / "resnet20-cifar10.th"
TEST_TAR = DEMO / "cifar10-test-1000.tar.gz"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The stage's inputs as committed artifacts: teacher (its model files) and data (test/, train/)."""
    from stages.data import prepare

    root = tmp_path_factory.mktemp("sensitivity-root")
    started = time.time()

    out = root / "out-teacher"
    out.mkdir()
    teacher = models.create("resnet20", pretrained_file=TEACHER)
    save_model(out, teacher, teacher.pcpp_recipe)
    teacher_art = commit(root, "teacher", "t0", {}, {}, out, {}, started)

    out = root / "out-data"
    prepare(TEST_TAR, out / "test", shard_size=50, limit_per_class=20, progress=False)
    # the BAT test only needs some training batches: the same slice will do
    shutil.copytree(out / "test", out / "train")
    data_art = commit(root, "data", "d0", {}, {}, out, {}, started)
    return {"teacher": teacher_art, "data": data_art}, root


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resnet20_scan(inputs, tmp_path, two_threads):
    arts, root = inputs
    t0 = time.time()
    ctx = StageContext(root=root, extra={"progress": False})
    metrics = sensitivity.run(SensitivityConfig(), arts, tmp_path / "out", ctx)
    elapsed = time.time() - t0

    rows = _read_csv(tmp_path / "out" / "sensitivity.csv")
    assert [r["block"] for r in rows] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    print(f"\nResNet-20, BNN++ weights, PTB of one block at a time, 200 test images ({elapsed:.1f} s):")
    print(f"  full precision: {100 * metrics['baseline_acc']:.1f}%")
    for r in rows:
        print(f"  {r['block']:<9} {int(r['params_binarized']):>6} params  acc {100 * float(r['acc_ptb']):5.1f}%  "
              f"drop {100 * float(r['drop_ptb']):5.1f} points")

    assert metrics["num_blocks"] == 9
    assert metrics["baseline_acc"] > 0.6  # the teacher's accuracy: 81% on the full test set
    assert all(float(r["acc_fp"]) == metrics["baseline_acc"] for r in rows)
    for r in rows:
        assert 0.0 <= float(r["acc_ptb"]) <= 1.0
        assert float(r["drop_ptb"]) == pytest.approx(float(r["acc_fp"]) - float(r["acc_ptb"]))
    # the blocks together hold every conv of the three stages (2 per block)
    teacher = models.create("resnet20")
    stage_convs = sum(m.weight.numel() for n, m in teacher.named_modules()
                      if n.startswith("layer") and isinstance(m, torch.nn.Conv2d))
    assert sum(int(r["params_binarized"]) for r in rows) == stage_convs
    assert all(int(r["layers_binarized"]) == 2 for r in rows)
    worst = max(rows, key=lambda r: float(r["drop_ptb"]))
    assert metrics["worst_block"] == worst["block"]
    assert metrics["worst_drop"] == pytest.approx(float(worst["drop_ptb"]))

    png = tmp_path / "out" / "sensitivity.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000


def test_bat_and_mlflow(inputs, tmp_path, two_threads):
    """Two blocks, a short BAT each, logged to a SQLite MLflow store: CSV/PNG artifacts, drop.<block>."""
    from mlflow import MlflowClient

    arts, root = inputs
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sens", artifact_location=(tmp_path / "mlartifacts").resolve().as_uri())
    run_id = client.create_run(exp).info.run_id
    ctx = StageContext(root=root, tracking_uri=uri, run_id=run_id, extra={"progress": False})
    cfg = {"blocks": ["layer1.0", "layer3.2"], "eval_limit": 40, "bat_steps": 2, "bat_lr": 1e-4, "batch_size": 20}
    metrics = sensitivity.run(SensitivityConfig(**cfg), arts, tmp_path / "out", ctx)

    rows = _read_csv(tmp_path / "out" / "sensitivity.csv")
    assert [r["block"] for r in rows] == cfg["blocks"]
    assert all("acc_bat" in r and "drop_bat" in r for r in rows)
    assert metrics["num_blocks"] == 2 and metrics["worst_block_bat"] in cfg["blocks"]

    logged = client.get_run(run_id).data.metrics
    assert logged["drop.layer1.0"] == pytest.approx(float(rows[0]["drop_ptb"]))
    assert logged["drop_bat.layer3.2"] == pytest.approx(float(rows[1]["drop_bat"]))
    assert {a.path for a in client.list_artifacts(run_id)} == {"sensitivity.csv", "sensitivity.png"}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="eval_limt") as err:
        build(SensitivityConfig, {"eval_limt": 10})
    for key in ("weight", "activation", "scaling", "blocks", "eval_limit", "bat_steps", "bat_lr", "batch_size"):
        assert key in str(err.value)


@pytest.mark.parametrize("cfg, match", [
    ({"weight": "bnn+++"}, "bnn"),
    ({"scaling": "row"}, "scaling"),
    ({"eval_limit": 0}, "eval_limit"),
    ({"bat_steps": -1}, "bat_steps"),
    ({"blocks": "layer1.0"}, "blocks"),
])
def test_bad_values_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        build(SensitivityConfig, cfg)
