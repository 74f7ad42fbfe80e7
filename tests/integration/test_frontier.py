"""A tiny accuracy-versus-size frontier (2 points: K = 0 and K = 1) through `pcpp run`, then the same pipeline
with a keep_fp policy in its train stage instead: real Ray, real MLflow (SQLite), the tests' 4-class images.
The K = 0 point is the train and export stages' own artifact (same key); the policy's training is K = 1's."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pcpp_run(config: Path, *overrides: str) -> str:
    """`pcpp run CONFIG OVERRIDES...` in a subprocess (its own loopback Ray); its console, after checking it ended 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX")}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), *overrides],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=1500)
    console = out.stdout.decode(errors="replace")
    assert out.returncode == 0, console[-4000:]
    return console


def test_a_two_point_frontier_through_pcpp_run(tiny_shards, tmp_path):
    from mlflow import MlflowClient

    from pcpp.mixed import rank
    from stages.sensitivity import read_csv

    train, test = tiny_shards
    root = tmp_path / "root"
    cfg = {
        "name": "tiny-frontier", "root": str(root), "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 160},
        "teacher": {"source": "train", "epochs": 1, "lr": 0.01},
        "binarize": {"weight": "bnn++"},
        "train": {"init": "teacher", "optim": {"epochs": 1, "lr": 0.005}},
        "sensitivity": {"enabled": True, "blocks": ["layer1.0", "layer3.2"], "eval_limit": 40, "batch_size": 40},
        "export": {"enabled": True}, "frontier": {"enabled": True, "keep": [1]},
        "distributed": {"num_workers": 1, "zero_stage": 1}, "tracking": {"experiment": "tiny-frontier"},
    }
    config = tmp_path / "tiny-frontier.yaml"
    config.write_text(yaml.safe_dump(cfg))
    console = pcpp_run(config)
    assert "stage frontier K=0 train: cached" in console and "stage frontier K=1 train: finished" in console, console

    summary = json.loads((root / "summary.json").read_text())
    artifacts = {k: Path(v) for k, v in summary["artifacts"].items()}
    with (artifacts["frontier"] / "frontier.csv").open(newline="") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["fp32", "K=0", "K=1"]
    fp, k0, k1 = rows["fp32"], rows["K=0"], rows["K=1"]
    assert float(fp["accuracy"]) == summary["metrics"]["teacher"]["accuracy"]
    # K = 0: the pipeline's own train and export artifacts
    assert k0["train_artifact"] == artifacts["train"].name and k0["export_artifact"] == artifacts["export"].name
    assert int(k0["file_bytes"]) == summary["metrics"]["export"]["file_bytes"]
    assert float(k0["accuracy"]) == summary["metrics"]["export"]["reloaded_acc"]
    # K = 1: the most sensitive block of the scan kept, a larger file, the size the policy predicted
    most = rank(read_csv(artifacts["sensitivity"] / "sensitivity.csv"))[1][0]
    assert k1["blocks"] == most and int(k1["kept_blocks"]) == 1
    assert int(k0["file_bytes"]) < int(k1["file_bytes"]) < int(fp["file_bytes"])
    assert abs(int(k1["file_bytes"]) - int(k1["predicted_bytes"])) <= 0.01 * int(k1["file_bytes"])
    assert 0.0 <= float(k1["accuracy"]) <= 1.0
    k1_train = json.loads((root / "artifacts" / k1["train_artifact"] / "keep_fp.json").read_text())
    assert k1_train["blocks"] == [most]
    decided = json.loads((artifacts["frontier"] / "points.json").read_text())  # each point's own decision
    assert list(decided) == ["K=0", "K=1"] and decided["K=1"]["policy"]["from_sensitivity"] == 1
    assert decided["K=1"]["blocks"] == [most] and decided["K=1"]["ranking"][0] == most
    assert decided["K=1"]["sizes"]["1"] == decided["K=1"]["predicted_bytes"] == int(k1["predicted_bytes"])
    assert (artifacts["frontier"] / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE

    client = MlflowClient(summary["tracking_uri"])
    parent = summary["run_id"]
    assert {a.path for a in client.list_artifacts(parent, "frontier")} == {"frontier/frontier.csv",
                                                                          "frontier/frontier.png"}
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    frontier_run = next(r for r in runs if r.data.tags.get("pcpp.stage") == "frontier")
    assert {a.path for a in client.list_artifacts(frontier_run.info.run_id)} == {"frontier.csv", "frontier.png",
                                                                                "points.json"}
    assert frontier_run.data.metrics["points"] == 2
    points = {(r.data.tags["pcpp.frontier.point"], r.data.tags["pcpp.stage"]): r for r in runs
              if "pcpp.frontier.point" in r.data.tags}
    assert set(points) == {(k, s) for k in ("K=0", "K=1") for s in ("train", "export")}
    assert points["K=0", "train"].data.tags["pcpp.cached"] == "true"
    assert points["K=1", "train"].data.tags["pcpp.cached"] == "false"
    assert points["K=1", "train"].data.params["keep_fp.blocks"] == most
    assert points["K=1", "export"].data.metrics["size_vs_prediction"] == 0.0
    # the point's training run says which point it is (the pipeline's own: "train (training)")
    names = {r.data.tags.get("mlflow.runName") for r in runs}
    assert "frontier K=1 train (training)" in names and "train (training)" in names, names
    assert f"frontier point K=1: keeps {most} in full precision" in console, console
    assert "frontier K=1: " in console and "honest accuracy" in console, console

    # The same pipeline with the policy in its train stage: data, teacher and scan cached, train resolves it
    # to K = 1's block, whose training the frontier already did (the same stage key): nothing trains again
    console = pcpp_run(config, "frontier.enabled=false", "binarize.keep_fp.from_sensitivity=1")
    assert f"stage train: keep_fp {{'from_sensitivity': 1, 'precision': 'fp32'}} keeps {most}" in console, console
    assert f"stage train keeping {most}: cached ({k1['train_artifact'].split('-', 1)[1]})" in console, console
    summary = json.loads((root / "summary.json").read_text())
    train_dir, metrics = Path(summary["artifacts"]["train"]), summary["metrics"]
    k1_dir = root / "artifacts" / k1["train_artifact"]
    assert (train_dir / "model.pt").read_bytes() == (k1_dir / "model.pt").read_bytes()  # the point's model
    assert (train_dir / "model.pt").stat().st_ino == (k1_dir / "model.pt").stat().st_ino  # linked, not copied
    assert json.loads((train_dir / "keep_fp.json").read_text())["blocks"] == [most]
    assert json.loads((train_dir / "binarize.json").read_text())["keep_fp"] == [most]  # what the model holds
    assert metrics["train"]["keep_fp_predicted_bytes"] == metrics["export"]["file_bytes"] == int(k1["file_bytes"])
    assert metrics["train"]["keep_fp_predicted_ratio"] == pytest.approx(metrics["export"]["ratio_to_fp32"])
    parent = client.get_run(summary["run_id"]).data
    assert parent.tags["pcpp.train.keep_fp_blocks"] == most and parent.tags["pcpp.export.keep_fp_blocks"] == most
    assert parent.metrics["export.file_bytes"] == parent.metrics["train.keep_fp_predicted_bytes"]
