"""Export precision of the kept tensors (`pcpp.export.save(..., precision=...)`, issue 11 item 3).

Round trip per precision: the manifest records it, the file stores the kept floating tensors in it, the
reloaded model is fp32 with every kept tensor equal to the original rounded to that dtype and back (a
closed form), and its logits equal binary_eval's (fp32) or lie within the documented bound (fp16, bf16).
Sizes are recomputed here from the kept tensors; ViT-B/16 BW at fp16 fits the paper's 15 MB. Bad values
are refused naming the valid ones, in pcpp, the stage config and the pipeline config; the export stage
records the precision in MLflow.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import pcpp.layers as pl
from pcpp import export, models
from pcpp.layers import binary_eval
from pcpp.surgery import binarize_

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data"
TEACHER = DEMO / "resnet20-cifar10.th"
PAPER_VIT_B_BYTES = 15_000_000  # ViT-B BW in the paper: 450 MB -> 15 MB


@pytest.fixture(scope="module")
def bw_resnet20():
    model = models.create("resnet20", pretrained_file=TEACHER)
    binarize_(model, {"scaling": "channel"})  # one scale per output channel: more scales to store
    return model.eval()


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def expected_bytes(model: torch.nn.Module, itemsize: int) -> int:
    """1 bit per binarized weight (whole bytes per layer) + its scales and every other floating tensor at
    `itemsize` bytes + integer tensors as they are."""
    binary = dict(pl.binary_layers(model))
    total = 0
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in binary and leaf == "weight":
            scales = t.shape[0] if binary[owner].scaling == "channel" else 1
            total += math.ceil(t.numel() / 8) + itemsize * scales
        else:
            total += t.numel() * (itemsize if t.is_floating_point() else t.element_size())
    return total


@pytest.mark.parametrize("precision", list(export.PRECISIONS))
def test_round_trip_per_precision(tmp_path, bw_resnet20, precision):
    model, dtype = bw_resnet20, export.PRECISIONS[precision]
    path = tmp_path / "m.safetensors"
    summary = export.save(model, path, precision=precision)
    manifest = json.loads(export.manifest_path(path).read_text())
    assert manifest["precision"] == summary.precision == precision
    with safe_open(str(path), "pt") as f:  # what the file holds: the kept floats and the scales in `dtype`
        stored = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert stored.pop("binary.bits") == torch.uint8 and stored.pop("binary.scales") == dtype
    assert stored == {f"flat.{str(dtype).removeprefix('torch.')}": dtype, "flat.int64": torch.int64}

    loaded = export.load(path)
    state, original = loaded.state_dict(), model.state_dict()
    binary = dict(pl.binary_layers(model))
    for key, t in original.items():
        assert state[key].dtype == t.dtype, key  # fp32 again (int64 counters stay int64)
        owner = key.rpartition(".")[0]
        if owner in binary and key.endswith(".weight"):  # +-s, with s rounded to `dtype`
            signs, s = binary[owner].binary_weight()
            assert torch.equal(state[key], signs * s.to(dtype).float()), key
        else:
            assert torch.equal(state[key], t.to(dtype).to(t.dtype) if t.is_floating_point() else t), key

    x = batch()
    with binary_eval(model), torch.no_grad():
        expected = model(x)
        got = loaded(x)
    error = export.round_trip_error(got, expected)
    bound = export.round_trip_tolerance(model, precision)
    assert bound == export.LOGIT_TOLERANCE[precision]
    if precision == "fp32":
        assert bound == 0.0 and torch.equal(got, expected)
    else:
        assert 0.0 < error <= bound, (precision, error)  # rounded, and within the documented bound
        assert torch.equal(got.argmax(1), expected.argmax(1))
    print(f"\nResNet-20 BW (channel scales) {precision}: round trip error {error:.2e} (bound {bound:g})")


def test_reduced_precision_saves_two_bytes_per_kept_value(tmp_path, bw_resnet20):
    model = bw_resnet20
    kept = sum(t.numel() for k, t in model.state_dict().items() if t.is_floating_point()
               and not (k.endswith(".weight") and k.rpartition(".")[0] in dict(pl.binary_layers(model))))
    scales = sum(m.weight.shape[0] for _, m in pl.binary_layers(model))  # channel scaling
    sizes = {p: export.save(model, tmp_path / f"{p}.safetensors", precision=p) for p in export.PRECISIONS}
    assert sizes["fp32"].ideal_bytes == expected_bytes(model, 4)
    for precision in ("fp16", "bf16"):
        s = sizes[precision]
        assert s.ideal_bytes == expected_bytes(model, 2) == sizes["fp32"].ideal_bytes - 2 * (kept + scales)
        assert s.ideal_bytes_kept_fp32 == sizes["fp32"].ideal_bytes  # the table shows both
        assert s.fp32_bytes == sizes["fp32"].fp32_bytes  # the float model does not change
        assert abs(s.file_bytes - s.ideal_bytes) < 1024  # the header, a few hundred bytes
        table = str(s)
        assert "kept fp32" in table and f"in {precision}" in table
        assert f"{s.ideal_bytes:,}" in table and f"{s.ideal_bytes_kept_fp32:,}" in table
    assert "kept fp32" not in str(sizes["fp32"])
    assert json.loads(export.manifest_path(tmp_path / "fp16.safetensors").read_text())["summary"][
        "ideal_bytes_kept_fp32"] == sizes["fp32"].ideal_bytes


def test_vit_b16_bw_fits_the_papers_15_mb_at_fp16():
    with torch.device("meta"):
        model = models.create("vit_base_patch16_224")
    binarize_(model)  # the default BW spec: patch embedding and head kept
    fp32, fp16 = export.size_summary(model), export.size_summary(model, "fp16")
    assert fp32.ideal_bytes == expected_bytes(model, 4) > PAPER_VIT_B_BYTES
    assert fp16.ideal_bytes == expected_bytes(model, 2) < PAPER_VIT_B_BYTES
    assert export.size_summary(model, "bf16").ideal_bytes == fp16.ideal_bytes
    print(f"\nViT-B/16 BW (meta): fp32 kept {fp32.ideal_bytes / 1e6:.2f} MB, fp16 kept {fp16.ideal_bytes / 1e6:.2f} MB "
          f"({fp16.ideal_bytes / 2**20:.2f} MiB), {fp16.ratio:.1f}x smaller than fp32")


def test_binarized_activations_have_no_logit_bound(tmp_path):
    # Sign activations turn rounding into flipped signs (pcpp.export's docstring): no bound is claimed at fp16,
    # while fp32 stays exact.
    model = models.create("resnet20", pretrained_file=TEACHER)
    binarize_(model, {"activation": "bnn++", "activation_placement": "hardtanh"})
    assert export.round_trip_tolerance(model, "fp32") == 0.0
    assert export.round_trip_tolerance(model, "fp16") is None and export.round_trip_tolerance(model, "bf16") is None
    path = tmp_path / "bwa.safetensors"
    export.save(model, path, precision="fp16")
    loaded = export.load(path)
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    assert torch.isfinite(loaded(batch(2))).all()


def test_manifests_from_before_the_option_load_as_fp32(tmp_path, bw_resnet20):
    path = tmp_path / "old.safetensors"
    export.save(bw_resnet20, path)
    mpath = export.manifest_path(path)
    manifest = json.loads(mpath.read_text())
    manifest.pop("precision")
    for entry in manifest["layout"]:
        if entry["kind"] == "tensor":
            entry.pop("dtype")
    mpath.write_text(json.dumps(manifest))
    x = batch(2)
    with binary_eval(bw_resnet20), torch.no_grad():
        assert torch.equal(export.load(path)(x), bw_resnet20(x))


@pytest.mark.parametrize("bad", ["fp8", "float16", "FP16", ""])
def test_unknown_precisions_are_refused_naming_the_valid_ones(tmp_path, bw_resnet20, bad):
    from stages.export import ExportConfig

    valid = r"valid: fp32, fp16, bf16"
    with pytest.raises(ValueError, match=rf"unknown export precision '{bad}'; {valid}"):
        export.save(bw_resnet20, tmp_path / "m.safetensors", precision=bad)
    assert not any(tmp_path.iterdir())  # refused before writing anything
    with pytest.raises(ValueError, match=valid):
        export.size_summary(bw_resnet20, bad)
    with pytest.raises(ValueError, match=valid):
        ExportConfig(precision=bad)


def test_the_pipeline_config_refuses_a_bad_precision_and_passes_a_good_one():
    from pipelines.config import PipelineConfig
    from stages.schema import ConfigError, build

    base = {"name": "p", "root": "runs/p", "model": {"name": "resnet20"}, "data": {"train": "a", "test": "b"},
            "teacher": {"source": "file", "path": "t.th"}}
    with pytest.raises(ConfigError, match=r"unknown export.precision 'fp64'; valid: fp32, fp16, bf16"):
        build(PipelineConfig, {**base, "export": {"precision": "fp64"}})
    assert build(PipelineConfig, base).stage_configs()["export"].precision == "fp32"
    chosen = build(PipelineConfig, {**base, "export": {"precision": "bf16"}})
    assert chosen.stage_configs()["export"].precision == "bf16"


def test_a_tensor_beyond_fp16_is_refused_naming_it(tmp_path, bw_resnet20):
    model = copy.deepcopy(bw_resnet20)
    with torch.no_grad():
        model.bn1.running_var[0] = 1e5  # fp16 tops at 65504
    with pytest.raises(ValueError, match=r"bn1.running_var in fp16: its values reach 1e\+05.*use bf16 or fp32"):
        export.save(model, tmp_path / "m.safetensors", precision="fp16")
    export.save(model, tmp_path / "m.safetensors", precision="bf16")  # bf16 has fp32's range
    assert export.load(tmp_path / "m.safetensors").bn1.running_var[0] == torch.tensor(1e5).bfloat16().float()


def test_values_fp16_rounds_to_zero_are_reported_naming_the_tensor(tmp_path, bw_resnet20):
    """A dead channel (weights ~1e-9, so its scale is ~1e-9) exported at fp16 stores a scale of 0: a
    RuntimeWarning names the tensor, the precision, the count and the smallest value; bf16 and fp32 keep it."""
    import warnings

    model = copy.deepcopy(bw_resnet20)
    layer = model.layer1[0].conv1
    with torch.no_grad():
        layer.weight[2] = 1e-9 * torch.sign(layer.weight[2])
    with pytest.warns(RuntimeWarning) as caught:
        export.save(model, tmp_path / "m.safetensors", precision="fp16")
    messages = [str(w.message) for w in caught]
    assert messages == ["exporting layer1.0.conv1.weight (scales) in fp16: 1 nonzero value(s) become 0 (the "
                        "smallest, 1e-09, is below fp16's smallest value 5.96e-08); use bf16 or fp32 to keep them"]
    assert export.load(tmp_path / "m.safetensors").layer1[0].conv1.weight_scale().reshape(-1)[2] == 0
    for precision in ("bf16", "fp32"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            export.save(model, tmp_path / "m.safetensors", precision=precision)
        assert export.load(tmp_path / "m.safetensors").layer1[0].conv1.weight_scale().reshape(-1)[2] > 0


# ---- the export stage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, bw_resnet20):
    """A data artifact (20 test images of the repository's CIFAR-10 sample) and a train artifact (BW ResNet-20)."""
    from stages.artifact import commit
    from stages.common import save_model
    from stages.data import prepare

    root = tmp_path_factory.mktemp("export-stage")
    data_out, train_out = root / "out-data", root / "out-train"
    prepare(DEMO / "cifar10-test-1000.tar.gz", data_out / "test", shard_size=20, limit_per_class=2, progress=False)
    train_out.mkdir()
    save_model(train_out, bw_resnet20, bw_resnet20.pcpp_recipe, {"scaling": "channel"})
    data = commit(root, "data", "d0", {}, {}, data_out, {}, time.time())
    train = commit(root, "train", "t0", {}, {}, train_out, {}, time.time())
    return root, {"data": data, "train": train}


def test_the_export_stage_stores_at_its_precision_and_records_it_in_mlflow(tmp_path, stage_inputs):
    from stages import export as stage
    from stages import tracking
    from stages.artifact import StageContext

    root, inputs = stage_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(uri, "export-precision", tmp_path / "mlartifacts", run_name="export")
    metrics = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        out.mkdir()
        ctx = StageContext(root=root, tracking_uri=uri, run_id=run.run_id if precision == "fp16" else None)
        metrics[precision] = stage.run(stage.ExportConfig(eval_limit=20, precision=precision), inputs, out, ctx)
        assert json.loads((out / "model.json").read_text())["precision"] == precision
    assert metrics["fp32"]["round_trip_exact"] == 1.0 and metrics["fp32"]["round_trip_error"] == 0.0
    assert "binary_acc" not in metrics["fp32"]
    m = metrics["fp16"]
    assert 0.0 < m["round_trip_error"] <= export.LOGIT_TOLERANCE["fp16"] and m["round_trip_exact"] == 0.0
    assert m["file_bytes"] < metrics["fp32"]["file_bytes"]
    assert m["ideal_bytes_kept_fp32"] == metrics["fp32"]["ideal_bytes"]
    assert m["reloaded_acc"] == m["binary_acc"]  # 20 images, BW: rounding changes no prediction
    data = run.client.get_run(run.run_id).data
    assert data.params["export.precision"] == "fp16" and data.params["export.eval_limit"] == "20"
    assert data.metrics["round_trip_error"] == pytest.approx(m["round_trip_error"])
