"""Bit-packed export (`pcpp.export`): packing, file size against an ideal computed here, exact round trip.

The ideal size is recomputed independently: 1 bit per binarized weight, rounded up to whole bytes per
layer, + 4 bytes per fp32 scale (one per layer, or one per output channel) + the bytes of every other
state-dict tensor. Run with `-s` to see the size ratios to fp32.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import pcpp.layers as pl
from pcpp import export, models, tasks
from pcpp.layers import BinaryMixin, binary_eval
from pcpp.surgery import binarize_

pytestmark = pytest.mark.unit

# the ResNet-20 teacher shipped with the repository (pipelines/demo_data/README.md)
TEACHER = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data" / "resnet20-cifar10.th"
DEIT = dict(img_size=32, patch_size=4, num_classes=10)


def ideal_bytes(model: nn.Module) -> int:
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryMixin)}
    total = 0
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in binary and leaf == "weight":
            scales = t.shape[0] if binary[owner].scaling == "channel" else 1
            total += math.ceil(t.numel() / 8) + 4 * scales
        else:
            total += t.numel() * t.element_size()
    return total


def randomize_fp_extras(model: nn.Module) -> None:
    """Give norms / ReAct betas values no default init has, so a store that drops them shows."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "act_threshold")) or ".extra_norm." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("norm.weight") else 0.0))


def check_two_values_per_group(model: nn.Module, original: nn.Module) -> None:
    """Every binarized weight takes exactly the values {-s, +s} in each scale group, s = mean |w*|."""
    binary = dict(pl.binary_layers(original))
    for name, layer in pl.binary_layers(model):
        w = layer.weight.detach()
        latent = binary[name].weight.detach()
        if layer.scaling == "channel":
            groups = zip(w.reshape(w.shape[0], -1), latent.reshape(w.shape[0], -1), strict=True)
        else:
            groups = [(w.reshape(-1), latent.reshape(-1))]
        for g, lat in groups:
            s = lat.abs().mean()
            assert torch.equal(g.unique(), torch.stack([-s, s])), name
            assert torch.equal(g > 0, lat >= 0), name


def round_trip(model: nn.Module, x: torch.Tensor, path: Path, name: str):
    summary = export.save(model, path)
    assert path.is_file() and export.manifest_path(path).is_file()
    ideal = ideal_bytes(model)
    assert summary.ideal_bytes == ideal
    assert summary.file_bytes == path.stat().st_size
    assert abs(summary.file_bytes - ideal) <= 0.02 * ideal, (summary.file_bytes, ideal)
    assert summary.binary_params == sum(m.weight.numel() for _, m in pl.binary_layers(model))

    with binary_eval(model):
        expected = model(x)
    loaded = export.load(path)
    assert not loaded.training
    assert set(dict(pl.binary_layers(loaded))) == set(dict(pl.binary_layers(model)))
    assert torch.equal(loaded(x), expected)
    check_two_values_per_group(loaded, model)
    print(
        f"\n{name}: fp32 {summary.fp32_bytes:,} B -> file {summary.file_bytes:,} B "
        f"(ideal {ideal:,} B): {summary.ratio:.1f}x smaller"
    )
    return summary, loaded


@pytest.fixture(scope="module")
def resnet20_teacher():
    assert TEACHER.is_file(), f"teacher checkpoint missing: {TEACHER}"
    return models.create("resnet20", pretrained_file=TEACHER)


@pytest.fixture(scope="module")
def deit_t():
    torch.manual_seed(0)
    model = models.create("deit_tiny_patch16_224", **DEIT)
    binarize_(model, {"extra_layernorm": True})
    randomize_fp_extras(model)
    return model.eval()


# ---- packing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 63, 64, 1001, 4096])
def test_pack_unpack_round_trip(n):
    gen = torch.Generator().manual_seed(n)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    packed = export.pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(export.unpack_signs(packed, n), signs)


def test_pack_bit_order_and_shapes():
    signs = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, -1, 1, 1])  # MSB first, 1 means +1
    assert export.pack_signs(signs).tolist() == [0b1000_0000, 0b1100_0000]
    w = torch.where(torch.randn(4, 3, 3, 3) >= 0, 1.0, -1.0)
    assert torch.equal(export.unpack_signs(export.pack_signs(w), w.numel()).reshape(w.shape), w)
    with pytest.raises(ValueError):
        export.unpack_signs(torch.zeros(2, dtype=torch.uint8), 17)


# ---- round trips --------------------------------------------------------------------------------------------


def test_resnet20_bw(tmp_path, resnet20_teacher):
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    summary, _ = round_trip(model, x, tmp_path / "r20.safetensors", "ResNet-20 BW")
    assert summary.ratio > 10


def test_resnet20_bwa_react_channel(tmp_path, resnet20_teacher):
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model, {"activation": {"name": "react", "learnable_beta": True}, "scaling": "channel"})
    randomize_fp_extras(model)
    assert sum(n.endswith("act_threshold") for n, _ in model.named_parameters()) == 18
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, loaded = round_trip(model, x, tmp_path / "r20-bwa.safetensors", "ResNet-20 BWA (react, channel)")
    for name, layer in pl.binary_layers(loaded):
        original = model.get_submodule(name)
        assert torch.equal(layer.act_threshold, original.act_threshold)
        assert layer.binary_config() == original.binary_config()


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("placement", ["threshold", "pre_relu", "hardtanh"])
def test_resnet20_thresholds_and_placement_round_trip(tmp_path, resnet20_teacher, task, placement):
    # Calibrated thresholds (distinct per channel) and the signed-input layout come back: the reloaded
    # logits equal the binary_eval logits exactly.
    from pcpp.calibration import calibrate_thresholds_

    model = copy.deepcopy(resnet20_teacher)
    placed = {} if task == tasks.BW else {"activation_placement": placement}  # BW has no activations to place
    spec = tasks.spec(task, "bnn", activation=None if task == tasks.BW else "bnn++", **placed)
    binarize_(model, spec)
    gen = torch.Generator().manual_seed(0)
    calibrate_thresholds_(model, [torch.randn(8, 3, 32, 32, generator=gen)])
    x = torch.randn(4, 3, 32, 32, generator=gen)
    _, loaded = round_trip(model, x, tmp_path / "r20.safetensors", f"ResNet-20 {task} ({placement})")
    for name, layer in pl.binary_layers(model):
        twin = loaded.get_submodule(name)
        assert twin.binary_config() == layer.binary_config(), name
        if layer.act_threshold is not None:
            assert layer.act_threshold.unique().numel() > 1
            assert torch.equal(twin.act_threshold, layer.act_threshold), name
    assert getattr(loaded, "pcpp_activation_layout", {}) == getattr(model, "pcpp_activation_layout", {})
    if task != tasks.BW and placement == "hardtanh":
        assert isinstance(loaded.layer1[0].relu1, nn.Hardtanh)


def test_vit_tokens_bwa_thresholds_round_trip(tmp_path):
    from pcpp.calibration import calibrate_thresholds_

    torch.manual_seed(0)
    model = models.create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                          num_classes=10)
    binarize_(model, {"activation": "bnn++", "accumulator_bits": 8})
    gen = torch.Generator().manual_seed(1)
    calibrate_thresholds_(model.eval(), [torch.randn(4, 3, 32, 32, generator=gen)])
    round_trip(model, torch.randn(2, 3, 32, 32, generator=gen), tmp_path / "vit.safetensors", "ViT BWAA")


def test_an_export_from_before_thresholds_still_loads(tmp_path, resnet20_teacher):
    # Manifests written before activation placements: no placement keys, ReAct's beta stored as
    # `act_quantizer.beta`. They load as the same network.
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model, {"activation": {"name": "react", "learnable_beta": True}, "activation_placement": "none"})
    with torch.no_grad():
        for _, layer in pl.binary_layers(model):
            layer.act_threshold.fill_(0.3)  # the old scalar beta, one value for every channel
    path = tmp_path / "old.safetensors"
    export.save(model, path)
    mpath = export.manifest_path(path)
    manifest = json.loads(mpath.read_text())
    for cfg in manifest["layers"].values():
        cfg.pop("activation_placement")
        cfg.pop("act_threshold")
        cfg["act_quantizer"]["options"]["learnable_beta"] = True
    manifest.pop("activation_layout")
    manifest.pop("binarize")  # recorded since the rebuild goes through binarize_: the per-layer settings serve
    for entry in manifest["layout"]:
        if entry["key"].endswith("act_threshold"):
            entry["key"] = entry["key"].replace("act_threshold", "act_quantizer.beta")
            entry["shape"], entry["numel"] = [1], 1
    mpath.write_text(json.dumps(manifest))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with binary_eval(model):
        expected = model(x)
    assert torch.equal(export.load(path)(x), expected)


def test_load_rebuilds_through_binarize_from_the_recorded_specs(tmp_path, resnet20_teacher):
    # A model binarized in two steps (BWA hardtanh on layer1, BW with channel scales elsewhere) comes back
    # through binarize_ from the two specs the manifest records, or from its per-layer settings without them.
    model = copy.deepcopy(resnet20_teacher)
    first = {"weight": "bnn", "activation": "bnn++", "include": ["layer1"], "activation_placement": "hardtanh"}
    binarize_(model, first)
    binarize_(model, {"weight": "ede", "scaling": "channel"})
    path = tmp_path / "steps.safetensors"
    export.save(model, path)
    manifest = json.loads(export.manifest_path(path).read_text())
    assert [s["include"] for s in manifest["binarize"]] == [["layer1"], ["*"]]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with binary_eval(model):
        expected = model(x)
    loaded = export.load(path)
    assert loaded.pcpp_binarize == manifest["binarize"]
    assert torch.equal(loaded(x), expected)
    manifest.pop("binarize")
    export.manifest_path(path).write_text(json.dumps(manifest))
    by_layer = export.load(path)
    assert [s["include"][:1] for s in by_layer.pcpp_binarize] == [["layer1.0.conv1"], ["layer2.0.conv1"]]
    assert torch.equal(by_layer(x), expected)
    for name, layer in pl.binary_layers(model):
        assert by_layer.get_submodule(name).binary_config() == layer.binary_config(), name


def test_load_refuses_specs_that_do_not_rebuild_the_export(tmp_path, resnet20_teacher):
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model, {"include": ["layer2"]})
    path = tmp_path / "m.safetensors"
    export.save(model, path)
    mpath = export.manifest_path(path)
    manifest = json.loads(mpath.read_text())
    manifest["binarize"][0]["include"] = ["layer3"]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="that the export does not have"):
        export.load(path)
    manifest["binarize"][0]["include"] = ["layer2"]
    manifest["binarize"][0]["scaling"] = "channel"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"layer2.0.conv1 rebuilt with other settings than exported: \['scaling'\]"):
        export.load(path)


def test_deit_t_extra_layernorm(tmp_path, deit_t):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, loaded = round_trip(deit_t, x, tmp_path / "deit.safetensors", "DeiT-T (32x32) BW + extra LayerNorm")
    norms = [n for n, _ in loaded.named_modules() if n.endswith("extra_norm")]
    assert len(norms) == 12
    for n in norms:
        assert torch.equal(loaded.get_submodule(n).weight, deit_t.get_submodule(n).weight)


def test_vit_b_size_summary_on_meta():
    with torch.device("meta"):
        model = models.create("vit_base_patch16_224")
    binarize_(model)
    summary = export.size_summary(model)
    assert summary.ideal_bytes == ideal_bytes(model)
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values())
    print(
        f"\nViT-B/16 BW (meta): fp32 {fp32 / 2**20:.1f} MiB -> {summary.ideal_bytes / 2**20:.1f} MiB (ideal): "
        f"{summary.ratio:.1f}x smaller"
    )
    assert summary.ratio > 15


@pytest.mark.parametrize("scaling", ["layer", "channel"])
def test_fp32_size_is_the_float_models_size(resnet20_teacher, scaling):
    # The baseline of the ratio is the full-precision model: its floating tensors at 4 bytes each.
    # The binarized layers' scales are part of the packed format, not of the fp32 model.
    model = copy.deepcopy(resnet20_teacher)
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    binarize_(model, {"scaling": scaling})
    summary = export.size_summary(model)
    assert summary.fp32_bytes == fp32
    assert summary.ratio == pytest.approx(fp32 / ideal_bytes(model))


@pytest.mark.parametrize(
    "weight",
    [{"name": "fp"}, {"name": "react", "beta": 0.05}],
    ids=["fp", "react-beta"],
)
def test_non_sign_weight_pairs_round_trip_or_are_refused(tmp_path, resnet20_teacher, weight):
    # Whatever honest value a weight pair has (identity for fp, sign(w/s - beta) for ReAct), the export
    # must reproduce it, or refuse to export: never silently store something else.
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model, {"weight": weight})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "odd.safetensors"
    try:
        export.save(model, path)
    except ValueError:
        return
    with binary_eval(model):
        expected = model(x)
    assert torch.equal(export.load(path)(x), expected)


def test_manifest_contents(tmp_path, resnet20_teacher):
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model, {"weight": "bnn", "activation": "bnn++", "accumulator_bits": 8})
    path = tmp_path / "m.safetensors"
    export.save(model, path)
    manifest = json.loads(export.manifest_path(path).read_text())
    assert manifest["recipe"]["name"] == "resnet20"
    assert set(manifest["layers"]) == set(dict(pl.binary_layers(model)))
    layer = manifest["layers"]["layer1.0.conv1"]
    assert layer["weight_quantizer"]["name"] == "bnn" and layer["accumulator_bits"] == 8
    assert {e["key"] for e in manifest["layout"]} == set(model.state_dict())
    loaded = export.load(path)
    assert all(m.accumulator_bits == 8 for _, m in pl.binary_layers(loaded))


# ---- damaged or missing files ---------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path, resnet20_teacher):
    model = copy.deepcopy(resnet20_teacher)
    binarize_(model)
    path = tmp_path / "r20.safetensors"
    export.save(model, path)
    return path


def test_corrupt_file(exported):
    data = bytearray(exported.read_bytes())
    data[len(data) // 2] ^= 0xFF
    exported.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="r20.safetensors"):
        export.load(exported)


def test_truncated_file(exported):
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="r20.safetensors"):
        export.load(exported)


def test_truncated_file_without_verification(exported):
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="r20.safetensors"):
        export.load(exported, verify=False)


def test_missing_manifest(exported):
    export.manifest_path(exported).unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        export.load(exported)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        export.load(tmp_path / "nothing.safetensors")


def test_save_needs_a_binarized_model(tmp_path, resnet20_teacher):
    with pytest.raises(ValueError, match="binarize_"):
        export.save(copy.deepcopy(resnet20_teacher), tmp_path / "plain.safetensors")
