"""keep_fp: blocks kept in full precision, by patterns or by a policy over a sensitivity scan (pcpp.mixed).

The policies read a sensitivity CSV as the scan stage writes it; every expected choice is written out here
by hand from the CSV, and every expected size is the size of a file pcpp.export.save really writes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from pcpp import export, models
from pcpp.layers import BinaryMixin
from pcpp.mixed import predict_file_bytes, rank, resolve
from pcpp.surgery import BinarizeSpec, binarize_
from stages.sensitivity import read_csv

pytestmark = pytest.mark.unit

BLOCKS = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
# ResNet-20's blocks: 2 convs each, 16 / 32 / 64 channels (layer2.0 and layer3.0 take the narrower input)
PARAMS = {"layer1": 4608, "layer2.0": 13824, "layer2": 18432, "layer3.0": 55296, "layer3": 73728}
# drops in points: layer3.2 and layer1.0 tie at the top (layer1.0 is cheaper: first), layer2.1 and layer2.2
# tie exactly (same size: the scan's order decides), layer1.1 is the least sensitive
DROPS = {"layer1.0": 0.30, "layer1.1": 0.01, "layer1.2": 0.05, "layer2.0": 0.12, "layer2.1": 0.20,
         "layer2.2": 0.20, "layer3.0": 0.02, "layer3.1": 0.08, "layer3.2": 0.30}
RANKING = ["layer1.0", "layer3.2", "layer2.1", "layer2.2", "layer2.0", "layer3.1", "layer1.2", "layer3.0", "layer1.1"]


def params(block: str) -> int:
    return PARAMS.get(block, PARAMS[block.split(".")[0]])


@pytest.fixture
def scan_csv(tmp_path) -> Path:
    """A sensitivity CSV in the scan stage's columns, with accuracies such as a 2,000-image test set gives."""
    path = tmp_path / "sensitivity.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["block", "layers_binarized", "params_binarized", "acc_fp", "acc_ptb",
                                          "drop_ptb"])
        w.writeheader()
        for b in BLOCKS:
            acc = round(0.81 - DROPS[b], 4)
            w.writerow({"block": b, "layers_binarized": 2, "params_binarized": params(b), "acc_fp": 0.81,
                        "acc_ptb": acc, "drop_ptb": 0.81 - acc})  # 0.81 - acc: ties that differ in the last bits
    return path


@pytest.fixture(scope="module")
def meta_resnet20():
    with torch.device("meta"):
        return models.create("resnet20")


def export_bytes(spec: dict, keep: list[str], tmp_path: Path, precision: str = "fp32") -> int:
    """Bytes of the file pcpp.export.save writes for ResNet-20 binarized by `spec` with `keep` kept."""
    model = models.create("resnet20")
    binarize_(model, {**spec, "keep_fp": keep})
    return export.save(model, tmp_path / "m.safetensors", precision=precision).file_bytes


# -- ranking --------------------------------------------------------------------------------------------------
def test_ranking_breaks_ties_by_size_then_scan_order(scan_csv):
    rows = read_csv(scan_csv)
    assert float(rows[0]["drop_ptb"]) != 0.30  # the CSV holds 0.81 - acc as computed, not the rounded drop
    assert rank(rows) == ("drop_ptb", RANKING)


def test_ranking_prefers_bat_drops_when_the_scan_has_them(scan_csv):
    rows = read_csv(scan_csv)
    for i, r in enumerate(rows):
        r["drop_bat"] = str(i / 100)  # BAT: the later the block, the larger the drop
    assert rank(rows) == ("drop_bat", BLOCKS[::-1])
    assert rank(rows, by="drop_ptb") == ("drop_ptb", RANKING)


def test_ranking_refuses_what_is_not_a_scan(scan_csv):
    rows = read_csv(scan_csv)
    with pytest.raises(ValueError, match="drop_bat.*drop_ptb"):
        rank(rows, by="drop_bat")
    with pytest.raises(ValueError, match="no sensitivity rows"):
        rank([])
    with pytest.raises(ValueError, match="layer1.0"):
        rank(rows + rows[:1])


# -- from_sensitivity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3, 8])
def test_from_sensitivity_keeps_the_k_most_sensitive_blocks(scan_csv, meta_resnet20, k):
    decision = resolve({"from_sensitivity": k}, read_csv(scan_csv), meta_resnet20, BinarizeSpec())
    assert decision.blocks == RANKING[:k]
    assert decision.ranking == RANKING and decision.by == "drop_ptb"


@pytest.mark.parametrize("k, words", [(9, ["every block", "no layer would be binarized", "0 to 8"]),
                                      (10, ["10", "more than the 9 blocks", "0 to 8"])])
def test_k_beyond_the_blocks_is_refused(scan_csv, meta_resnet20, k, words):
    with pytest.raises(ValueError) as err:
        resolve({"from_sensitivity": k}, read_csv(scan_csv), meta_resnet20, BinarizeSpec())
    for w in words:
        assert w in str(err.value)


def test_without_first_and_head_kept_every_block_can_be_kept(scan_csv, meta_resnet20):
    spec = BinarizeSpec(keep_first=False, keep_head=False)
    assert resolve({"from_sensitivity": 9}, read_csv(scan_csv), meta_resnet20, spec).blocks == RANKING


# -- budgets ---------------------------------------------------------------------------------------------------
def test_budget_bytes_keeps_the_largest_prefix_that_fits(scan_csv, meta_resnet20, tmp_path):
    rows = read_csv(scan_csv)
    sizes = [export_bytes({}, RANKING[:k], tmp_path) for k in range(4)]
    assert sizes == sorted(sizes)
    just_k0 = resolve({"budget_bytes": sizes[1] - 1}, rows, meta_resnet20, BinarizeSpec())
    assert just_k0.blocks == []  # fits nothing: the binarized model alone
    assert resolve({"budget_bytes": sizes[2]}, rows, meta_resnet20, BinarizeSpec()).blocks == RANKING[:2]
    assert resolve({"budget_bytes": sizes[3] - 1}, rows, meta_resnet20, BinarizeSpec()).blocks == RANKING[:2]


def test_a_budget_that_fits_everything_keeps_every_block_that_leaves_a_binarized_layer(scan_csv, meta_resnet20):
    rows = read_csv(scan_csv)
    # first layer and head in full precision: all 9 blocks kept would be the full-precision model
    assert resolve({"budget_bytes": 10**9}, rows, meta_resnet20, BinarizeSpec()).blocks == RANKING[:8]
    assert resolve({"budget_ratio": 1.0}, rows, meta_resnet20, BinarizeSpec()).blocks == RANKING[:8]
    spec = BinarizeSpec(keep_first=False, keep_head=False)
    assert resolve({"budget_bytes": 10**9}, rows, meta_resnet20, spec).blocks == RANKING


def test_budget_ratio_is_the_export_ratio_to_fp32(scan_csv, meta_resnet20, tmp_path):
    rows = read_csv(scan_csv)
    model = models.create("resnet20")
    binarize_(model, {"keep_fp": RANKING[:1]})
    summary = export.save(model, tmp_path / "m.safetensors")
    ratio = summary.fp32_bytes / summary.file_bytes  # what the export stage logs as ratio_to_fp32
    assert resolve({"budget_ratio": ratio}, rows, meta_resnet20, BinarizeSpec()).blocks == RANKING[:1]
    assert resolve({"budget_ratio": ratio * 1.01}, rows, meta_resnet20, BinarizeSpec()).blocks == []


@pytest.mark.parametrize("policy", [{"budget_bytes": 1000}, {"budget_ratio": 40.0}])
def test_a_budget_not_even_the_binarized_model_meets_is_refused(scan_csv, meta_resnet20, tmp_path, policy):
    smallest = export_bytes({}, [], tmp_path)
    with pytest.raises(ValueError) as err:
        resolve(policy, read_csv(scan_csv), meta_resnet20, BinarizeSpec())
    assert str(next(iter(policy.values()))) in str(err.value) and str(smallest) in str(err.value)


# -- predicted size = exported size ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pcpp.calibration.UncalibratedThresholdsWarning")  # sizes only
@pytest.mark.parametrize("spec, precision", [
    ({}, "fp32"),
    ({"scaling": "channel"}, "fp16"),
    ({"activation": "bnn++", "activation_placement": "threshold"}, "bf16"),
])
@pytest.mark.parametrize("policy", [{"from_sensitivity": 2}, {"budget_ratio": 5.0}])
def test_the_exported_file_is_the_size_the_policy_predicts(scan_csv, meta_resnet20, tmp_path, spec, precision,
                                                           policy):
    decision = resolve({**policy, "precision": precision}, read_csv(scan_csv), meta_resnet20, BinarizeSpec(**spec))
    actual = export_bytes(spec, decision.blocks, tmp_path, precision)
    assert abs(actual - decision.predicted_bytes) <= 0.01 * actual  # the contract: within 1%
    assert actual == decision.predicted_bytes  # and in fact exact: data plus the safetensors header
    if "budget_ratio" in policy:
        assert decision.predicted_ratio >= 5.0


def test_predict_file_bytes_on_a_vit(tmp_path):
    torch.manual_seed(0)
    model = models.create("deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, depth=2)
    binarize_(model, {"keep_fp": ["blocks.0.attn"]})
    predicted = predict_file_bytes(model, "bf16")
    assert predicted == export.save(model, tmp_path / "d.safetensors", precision="bf16").file_bytes


# -- the spec and binarize_ ------------------------------------------------------------------------------------
def test_keep_fp_patterns_keep_those_layers_in_full_precision():
    model = models.create("resnet20")
    report = binarize_(model, {"keep_fp": ["layer3.2", "layer1.0"]})
    kept = {r.name for r in report.rows if r.action == "kept (keep_fp)"}
    assert kept == {f"{b}.conv{i}" for b in ("layer1.0", "layer3.2") for i in (1, 2)}
    assert not any(isinstance(m, BinaryMixin) for m in model.layer3[2].modules())
    assert isinstance(model.layer3[1].conv1, BinaryMixin)


def test_a_policy_must_be_resolved_before_binarize():
    with pytest.raises(ValueError, match="policy.*pcpp.mixed.resolve"):
        binarize_(models.create("resnet20"), {"keep_fp": {"from_sensitivity": 2}})


def test_a_keep_fp_pattern_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="layer9"):
        binarize_(models.create("resnet20"), {"keep_fp": ["layer9.0"]})


@pytest.mark.parametrize("keep_fp, words", [
    ({"from_sensitivty": 2}, ["from_sensitivty", "from_sensitivity", "budget_bytes", "budget_ratio", "by"]),
    ({"from_sensitivity": -1}, ["from_sensitivity", "-1", ">= 0"]),
    ({"from_sensitivity": 1.5}, ["from_sensitivity", "1.5", "integer"]),
    ({"budget_bytes": 0}, ["budget_bytes", "0", ">= 1"]),
    ({"budget_ratio": 0}, ["budget_ratio", "> 0"]),
    ({"from_sensitivity": 1, "budget_bytes": 9}, ["exactly one", "from_sensitivity", "budget_bytes"]),
    ({"by": "drop_ptb"}, ["exactly one"]),
    ({"from_sensitivity": 1, "by": "acc"}, ["acc", "drop_ptb", "drop_bat"]),
    ({"budget_bytes": 9, "precision": "fp8"}, ["fp8", "fp32", "fp16", "bf16"]),
    (3, ["3", "patterns", "from_sensitivity"]),
])
def test_bad_keep_fp_values_are_refused(keep_fp, words):
    with pytest.raises(ValueError) as err:
        BinarizeSpec(keep_fp=keep_fp)
    for w in words:
        assert w in str(err.value)


def test_keep_fp_round_trips():
    for keep_fp in (["layer1.0"], {"budget_ratio": 12.5, "by": "drop_bat", "precision": "fp16"}):
        spec = BinarizeSpec(keep_fp=keep_fp)
        assert BinarizeSpec.from_dict(spec.to_dict()) == spec
    assert BinarizeSpec(keep_fp="layer1.0").keep_fp == ["layer1.0"]
