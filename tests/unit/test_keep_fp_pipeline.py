"""keep_fp in the pipeline: config checks, the DAG's order, the training stages' resolution from a sensitivity
artifact, the export stage's record, the frontier's points and plot. No Ray (the integration test runs it)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from pcpp import models
from pcpp.surgery import binarize_
from pipelines.config import PipelineConfig
from pipelines.runner import plan
from stages import registry
from stages.artifact import StageContext, commit
from stages.config import ConfigError, build
from stages.frontier import FrontierConfig

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data"
BASE = {"name": "mixed", "root": "runs/mixed", "model": {"name": "resnet20", "num_classes": 10},
        "data": {"train": "src/train", "test": "src/test"}, "teacher": {"source": "file", "path": "teacher.th"}}
BLOCKS = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
DROPS = [0.30, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.01, 0.02]  # layer1.0, then layer1.1, layer1.2, ...


def pipeline(**sections) -> PipelineConfig:
    return build(PipelineConfig, {**BASE, **sections})


# -- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sections, words", [
    ({"binarize": {"keep_fp": {"from_sensitivity": 2}}, "sensitivity": {"enabled": False}},
     ["from_sensitivity", "sensitivity.enabled: true", "or give binarize.keep_fp as module-name patterns"]),
    ({"frontier": {"enabled": True}, "sensitivity": {"enabled": False}},
     ["frontier.enabled needs the sensitivity scan", "set sensitivity.enabled: true"]),
    ({"frontier": {"enabled": True}, "binarize": {"keep_fp": {"budget_ratio": 10}}},
     ["frontier sets keep_fp per point", "budget_ratio"]),
    ({"binarize": {"keep_fp": {"from_sensitivity": 3}}, "sensitivity": {"blocks": ["layer1.0", "layer3.2"]}},
     ["from_sensitivity 3", "2 blocks", "layer3.2", "0 to 2"]),
    ({"frontier": {"enabled": True, "keep": [0, 5]}, "sensitivity": {"blocks": ["layer1.0"]}},
     ["frontier.keep 5", "0 to 1"]),
    ({"frontier": {"budget_ratio": [-2.0]}}, ["budget_ratio=-2", "> 0"]),
    ({"frontier": {"by": "acc_ptb"}}, ["acc_ptb", "drop_ptb", "drop_bat"]),
    ({"frontier": {"keeps": [1]}}, ["keeps", "keep", "budget_bytes"]),
    ({"binarize": {"keep_fp": {"budget": 1000}}}, ["budget", "budget_bytes", "budget_ratio", "from_sensitivity"]),
])
def test_bad_configs_are_refused_at_load(sections, words):
    with pytest.raises(ConfigError) as err:
        pipeline(**sections)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("sections, words", [
    ({"frontier": {"enabled": True, "keep": [0, 20]}},
     ["frontier point K=20", "more than the 9 blocks", "valid: 0 to 8", "9 would leave no layer binarized"]),
    ({"frontier": {"enabled": True, "budget_bytes": [1000]}},
     ["frontier point budget_bytes=1000", "cannot be met", "49304 bytes", "budget_ratio of at most 21.99"]),
    ({"frontier": {"enabled": True, "budget_ratio": [100.0]}}, ["frontier point budget_ratio=100", "cannot be met"]),
    ({"binarize": {"keep_fp": ["layer9.9"]}}, ["binarize.keep_fp", "'layer9.9' matches no module"]),
    ({"binarize": {"keep_fp": {"budget_bytes": 1000}}}, ["binarize.keep_fp", "budget_bytes 1000 cannot be met"]),
    ({"binarize": {"keep_fp": {"from_sensitivity": 1, "by": "drop_bat"}}},  # the scan runs PTB only
     ["binarize.keep_fp: by: drop_bat", "bat_steps: 0", "bat_steps >= 1", "drop_ptb"]),
    ({"frontier": {"enabled": True, "by": "drop_bat"}}, ["frontier.by: drop_bat", "bat_steps >= 1", "drop_ptb"]),
])
def test_what_the_scan_cannot_change_is_refused_before_any_stage(sections, words):
    """pipelines.runner.run calls check_keep_fp before Ray and MLflow start: a typo costs seconds, not the
    trainings of the stages before the frontier (the fp32 export of ResNet-20 with no block kept: 49,304 B)."""
    pc = pipeline(**sections)
    with pytest.raises(ValueError) as err:
        pc.check_keep_fp()
    for w in words:
        assert w in str(err.value)


def test_points_the_model_can_take_pass_the_check():
    frontier = {"enabled": True, "keep": [0, 8], "budget_bytes": [49304], "budget_ratio": [12.0]}
    pipeline(frontier=frontier).check_keep_fp()
    pipeline(frontier={**frontier, "by": "drop_bat"}, sensitivity={"bat_steps": 2}).check_keep_fp()  # BAT drops
    pipeline(frontier={"enabled": True, "keep": [0, 7]}, binarize={"keep_fp": ["layer3.2"]}).check_keep_fp()
    with pytest.raises(ValueError, match="frontier point K=8: .* every block"):  # layer3.2 kept besides: nothing left
        pipeline(frontier={"enabled": True, "keep": [8]}, binarize={"keep_fp": ["layer3.2"]}).check_keep_fp()


def test_a_policy_is_priced_at_the_export_precision_unless_it_says():
    pc = pipeline(binarize={"keep_fp": {"budget_bytes": 90000}}, export={"precision": "fp16"})
    assert pc.binarize.keep_fp == {"budget_bytes": 90000}  # the section as written
    for stage in ("pretrain", "train"):
        assert pc.stage_config(stage).binarize.keep_fp == {"budget_bytes": 90000, "precision": "fp16"}
    own = pipeline(binarize={"keep_fp": {"budget_bytes": 90000, "precision": "bf16"}}, export={"precision": "fp16"})
    assert own.stage_config("train").binarize.keep_fp["precision"] == "bf16"


def test_yaml_and_overrides_take_every_form(tmp_path):
    from pipelines.config import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("model: {name: resnet20}\nteacher: {source: train}\n"
                    "binarize: {weight: bnn++, keep_fp: [layer3.2]}\n")
    assert load_pipeline(path).binarize.keep_fp == ["layer3.2"]
    pc = load_pipeline(path, ["binarize.keep_fp.from_sensitivity=2", "binarize.keep_fp.by=drop_bat"])
    assert pc.binarize.keep_fp == {"from_sensitivity": 2, "by": "drop_bat"}
    pc = load_pipeline(path, ["binarize.keep_fp=layer1.0", "frontier.enabled=true", "frontier.budget_ratio=[12, 8.5]"])
    assert pc.binarize.keep_fp == ["layer1.0"] and pc.frontier.budget_ratio == [12.0, 8.5]


# -- the DAG ------------------------------------------------------------------------------------------------------
def test_a_policy_makes_the_training_stages_read_the_scan_and_run_after_it():
    order = [(s.name, s.deps) for s in plan(pipeline(binarize={"keep_fp": {"from_sensitivity": 1}},
                                                     pretrain={"enabled": True}))]
    names = [n for n, _ in order]
    assert names.index("sensitivity") < names.index("pretrain") < names.index("train")
    assert "sensitivity" in dict(order)["pretrain"] and "sensitivity" in dict(order)["train"]
    plain = dict((s.name, s.deps) for s in plan(pipeline(binarize={"keep_fp": ["layer3.2"]})))
    assert plain["train"] == ["data", "teacher"]  # patterns: no wait for the scan


def test_the_frontier_runs_last_after_train_and_export():
    order = [(s.name, s.deps) for s in plan(pipeline(frontier={"enabled": True}))]
    assert order[-1] == ("frontier", ["data", "teacher", "sensitivity", "train", "export"])


def test_a_stage_whose_config_reads_a_disabled_stage_is_refused():
    cfg = pipeline(binarize={"keep_fp": {"from_sensitivity": 1}}).stage_config("train")
    with pytest.raises(ValueError, match="train reads the sensitivity stage's artifact .*not enabled"):
        registry.get("train").inputs_for(cfg, ["data", "teacher", "train"])


# -- the training stages' resolution, the export stage's record ------------------------------------------------------
@pytest.fixture
def sensitivity_artifact(tmp_path):
    out = tmp_path / "out-sens"
    out.mkdir()
    with (out / "sensitivity.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "layers_binarized", "params_binarized", "acc_fp", "acc_ptb", "drop_ptb"])
        for b, d in zip(BLOCKS, DROPS):
            w.writerow([b, 2, 1000, 0.9, 0.9 - d, d])
    return commit(tmp_path, "sensitivity", "s0", {}, {}, out, {}, time.time())


def test_the_training_stages_resolve_a_policy_from_the_scan(sensitivity_artifact):
    from stages.mixed import decide, with_keep_fp

    cfg = pipeline(binarize={"keep_fp": {"from_sensitivity": 2}}).stage_config("train")
    decision = decide(cfg, {"sensitivity": sensitivity_artifact})
    assert decision.blocks == ["layer1.0", "layer1.1"]
    assert with_keep_fp(cfg, decision.blocks).binarize.keep_fp == ["layer1.0", "layer1.1"]
    with pytest.raises(ValueError, match="no sensitivity artifact.*enable the sensitivity stage"):
        decide(cfg, {"data": sensitivity_artifact})
    assert decide(pipeline().stage_config("train"), {}) is None  # nothing kept: nothing to record


def test_the_export_stage_records_the_kept_blocks_and_its_size_against_the_prediction(tmp_path,
                                                                                      sensitivity_artifact):
    from stages import export as stage
    from stages import tracking
    from stages.common import save_model
    from stages.data import prepare
    from stages.mixed import KEEP_FP_FILE, decide, record

    cfg = pipeline(binarize={"keep_fp": {"budget_ratio": 14.0}}).stage_config("train")
    decision = decide(cfg, {"sensitivity": sensitivity_artifact})  # K=1 is 16x smaller than fp32, K=2 13x
    assert decision.blocks == ["layer1.0"] and decision.predicted_ratio >= 14.0
    data_out, train_out = tmp_path / "out-data", tmp_path / "out-train"
    prepare(DEMO / "cifar10-test-1000.tar.gz", data_out / "test", shard_size=20, limit_per_class=2, progress=False)
    train_out.mkdir()
    model = models.create("resnet20")
    spec = {"keep_fp": decision.blocks}
    binarize_(model, spec)
    save_model(train_out, model, model.pcpp_recipe, spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_run = tracking.start_run(uri, "keep-fp", tmp_path / "mlartifacts", run_name="train")
    trained = record(decision, train_out, StageContext(root=tmp_path, tracking_uri=uri, run_id=train_run.run_id))
    assert trained["keep_fp_blocks"] == "layer1.0" and json.loads((train_out / KEEP_FP_FILE).read_text())["blocks"]
    assert [a.path for a in train_run.client.list_artifacts(train_run.run_id)] == [KEEP_FP_FILE]  # in the UI too
    inputs = {"data": commit(tmp_path, "data", "d0", {}, {}, data_out, {}, time.time()),
              "train": commit(tmp_path, "train", "t0", {}, {}, train_out, trained, time.time())}
    run = tracking.start_run(uri, "keep-fp", tmp_path / "mlartifacts", run_name="export")
    out = tmp_path / "out-export"
    out.mkdir()
    torch.manual_seed(0)
    m = stage.run(stage.ExportConfig(eval_limit=20), inputs, out, StageContext(root=tmp_path, tracking_uri=uri,
                                                                                 run_id=run.run_id))
    assert m["file_bytes"] == m["predicted_bytes"] == decision.predicted_bytes and m["size_vs_prediction"] == 0.0
    assert m["ratio_to_fp32"] == pytest.approx(decision.predicted_ratio)
    assert m["keep_fp_count"] == 1 and m["keep_fp_blocks"] == "layer1.0"
    params = run.client.get_run(run.run_id).data.params
    assert params["keep_fp.blocks"] == "layer1.0" and json.loads(params["keep_fp.policy"])["budget_ratio"] == 14.0


# -- the frontier's points and plot ---------------------------------------------------------------------------------
def test_frontier_points_start_at_k0_and_name_each_policy_once():
    cfg = FrontierConfig(keep=[2, 1, 2], budget_bytes=[90000, 90000], budget_ratio=[12.5], by="drop_bat")
    points = cfg.points()
    assert [label for label, _ in points] == ["K=0", "K=1", "K=2", "budget_bytes=90000", "budget_ratio=12.5"]
    assert points[3][1] == {"budget_bytes": 90000, "precision": "fp32", "by": "drop_bat"}
    assert FrontierConfig(keep=[]).points()[0] == ("K=0", {"from_sensitivity": 0, "precision": "fp32"})


def test_the_frontier_plot_writes_a_png(tmp_path):
    from stages.plots import frontier

    rows = [{"point": "fp32", "kind": "fp", "file_bytes": 1_100_000, "accuracy": 0.91},
            {"point": "K=0", "kind": "binary", "file_bytes": 49_304, "accuracy": 0.80},
            {"point": "budget_bytes=60000", "kind": "binary", "file_bytes": 49_304, "accuracy": 0.80},
            {"point": "K=1", "kind": "binary", "file_bytes": 67_152, "accuracy": 0.84}]
    path = frontier(rows, tmp_path / "f.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no frontier points"):
        frontier([], tmp_path / "g.png")


def test_the_frontier_without_a_scan_is_not_told_to_give_patterns():
    with pytest.raises(ConfigError) as err:  # patterns would not give the frontier its ranking
        pipeline(frontier={"enabled": True}, sensitivity={"enabled": False})
    assert "module-name patterns" not in str(err.value)
