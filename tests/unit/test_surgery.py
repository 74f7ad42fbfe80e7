"""Model surgery (`pcpp.surgery.binarize_`) on ResNet-20, DeiT-T and, on the meta device, ResNet-50 / Swin-T / ViT-B.

Expected module sets are derived here from the models' own Conv2d / Linear modules (first layer and head
kept, everything else binarized), not from the library's report.
"""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import pcpp.layers as pl
from pcpp import models, tasks
from pcpp.layers import BinaryConv2d, BinaryLinear, BinaryMixin, binary_eval
from pcpp.surgery import BinarizeSpec, binarize_

pytestmark = pytest.mark.unit

# the ResNet-20 teacher shipped with the repository (pipelines/demo_data/README.md)
TEACHER = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data" / "resnet20-cifar10.th"
DEIT = dict(img_size=32, patch_size=4, num_classes=10)


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def binarized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, BinaryMixin)}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


@pytest.fixture
def resnet20():
    torch.manual_seed(0)
    return models.create("resnet20")


@pytest.fixture(scope="module")
def deit_model():
    torch.manual_seed(0)
    return models.create("deit_tiny_patch16_224", **DEIT)


@pytest.fixture(scope="module")
def deit_state(deit_model):
    return {k: v.clone() for k, v in deit_model.state_dict().items()}


def deit(model):
    return copy.deepcopy(model)  # building DeiT-T takes seconds; copies keep each test's surgery apart


# ---- ResNet-20 --------------------------------------------------------------------------------------------


def test_resnet20_default_keeps_first_and_head(resnet20):
    convs = [n for n, m in resnet20.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19
    report = binarize_(resnet20, BinarizeSpec())
    assert binarized_names(resnet20) == set(convs) - {"conv1"}
    assert type(resnet20.conv1) is nn.Conv2d and type(resnet20.linear) is nn.Linear
    assert all(type(resnet20.get_submodule(n)) is BinaryConv2d for n in convs if n != "conv1")
    assert set(report.binarized) == set(convs) - {"conv1"}
    assert set(report.kept) == {"conv1", "linear"}
    assert report.binary_params == sum(resnet20.get_submodule(n).weight.numel() for n in report.binarized)

    text = str(report)
    lines = text.splitlines()
    for name in convs + ["linear"]:
        assert sum(line.split()[0] == name for line in lines if line.split()) == 1, name
    assert "18 of 20 layers binarized" in text
    assert f"{report.binary_params:,}" in text
    assert next(line for line in lines if line.split()[0] == "conv1").rstrip().endswith("kept (first layer)")
    assert next(line for line in lines if line.split()[0] == "linear").rstrip().endswith("kept (head)")


@pytest.mark.parametrize("spec", [{}, {"activation": "bnn++", "activation_placement": "pre_relu"},
                                  {"activation": "bnn++", "activation_placement": "hardtanh"}])
def test_resnet20_binarized_loads_teacher_strict(resnet20, spec):
    # Placements without a threshold add no parameter: a teacher loads strictly after surgery too.
    assert TEACHER.is_file(), f"teacher checkpoint missing: {TEACHER}"
    binarize_(resnet20, {**spec, "scaling": "channel"})
    models.load_checkpoint(resnet20, TEACHER, strict=True)
    teacher = models.create("resnet20", pretrained_file=TEACHER)
    for key, value in teacher.state_dict().items():
        assert torch.equal(resnet20.state_dict()[key], value), key


def test_resnet20_layer_settings_follow_spec(resnet20):
    spec = BinarizeSpec(
        weight={"name": "bnn++", "mu": 7.0}, activation="react", scaling="channel", units="raw", accumulator_bits=8
    )
    binarize_(resnet20, spec)
    layers = [m for _, m in pl.binary_layers(resnet20)]
    assert len(layers) == 18
    for m in layers:
        assert (m.scaling, m.units, m.accumulator_bits) == ("channel", "raw", 8)
        assert m.weight_quantizer.name == "bnn++" and m.weight_quantizer.params == {"mu": 7.0}
        assert m.act_quantizer.name == "react"
    assert len({id(m.weight_quantizer) for m in layers}) == 18  # one quantizer per layer, not shared
    assert spec.task == tasks.BWAA


def test_resnet20_include_one_stage(resnet20):
    report = binarize_(resnet20, {"include": ["layer2"]})
    expected = {f"layer2.{b}.conv{c}" for b in range(3) for c in (1, 2)}
    assert binarized_names(resnet20) == expected
    assert set(report.binarized) == expected
    assert "6 of 20 layers binarized" in str(report)


def test_resnet20_exclude_pattern(resnet20):
    binarize_(resnet20, {"exclude": ["layer3.*"]})
    expected = {f"layer{s}.{b}.conv{c}" for s in (1, 2) for b in range(3) for c in (1, 2)}
    assert binarized_names(resnet20) == expected


def test_resnet20_keep_first_and_head_can_be_turned_off(resnet20):
    binarize_(resnet20, {"keep_first": False, "keep_head": False})
    assert binarized_names(resnet20) == set(layers_of(resnet20))
    assert type(resnet20.linear) is BinaryLinear


def test_binarize_twice_keeps_binarized_layers(resnet20):
    binarize_(resnet20, {"include": ["layer1"]})
    before = {n: id(m) for n, m in resnet20.named_modules() if isinstance(m, BinaryMixin)}
    report = binarize_(resnet20)
    assert all(id(resnet20.get_submodule(n)) == i for n, i in before.items())
    assert len(binarized_names(resnet20)) == 18
    assert sum(r.action == "kept (already binarized)" for r in report.rows) == 6


def test_resnet20_forward_backward_bwaa(resnet20):
    binarize_(resnet20, {"activation": "bnn++", "accumulator_bits": 8})
    x = torch.randn(2, 3, 32, 32)
    resnet20(x).logsumexp(1).sum().backward()
    for _, m in pl.binary_layers(resnet20):
        assert torch.isfinite(m.weight.grad).all() and m.weight.grad.abs().sum() > 0
    with binary_eval(resnet20):
        assert torch.isfinite(resnet20(x)).all()
    assert set(pl.overflow_rates(resnet20)) == binarized_names(resnet20)


# ---- DeiT-T (timm) ------------------------------------------------------------------------------------------


def test_deit_binarized_and_kept(deit_model):
    model = deit(deit_model)
    report = binarize_(model, {"extra_layernorm": False})
    expected = {f"blocks.{i}.{p}" for i in range(12) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert len(expected) == 48
    assert binarized_names(model) == expected
    assert set(report.kept) == {"patch_embed.proj", "head"}
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear


def test_deit_extra_layernorm(deit_model, deit_state):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    plain = deit(deit_model).eval()
    model = deit(deit_model).eval()
    report = binarize_(model, {"weight": "fp", "scaling": "none", "extra_layernorm": True})
    # with fp weights the only change is the new norms
    assert report.added_norms == [f"blocks.{i}.attn" for i in range(12)]
    norms = [n for n, m in model.named_modules() if n.endswith("extra_norm")]
    assert norms == [f"blocks.{i}.attn.extra_norm" for i in range(12)]
    assert all(type(model.get_submodule(n)) is nn.LayerNorm for n in norms)
    assert "extra LayerNorm after 12 attention blocks" in str(report)
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))

    # no existing parameter renamed: the pre-surgery state dict loads, only the new norms are missing
    missing, unexpected = model.load_state_dict(deit_state, strict=False)
    assert unexpected == []
    assert missing and all(".extra_norm." in k for k in missing)
    assert set(missing) == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}

    # the norm acts on the attention block's output
    seen = {}
    model.blocks[0].attn.extra_norm.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(x)
    assert seen["out"].shape == (2, 65, 192)
    torch.testing.assert_close(seen["out"].mean(-1), torch.zeros(2, 65), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "spec",
    [tasks.spec(task, "bnn++") for task in tasks.TASKS],
    ids=list(tasks.TASKS),
)
def test_deit_forward_backward(deit_model, spec):
    model = deit(deit_model)
    binarize_(model, {**spec, "extra_layernorm": True})
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    for name, m in pl.binary_layers(model):
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all(), name
    with binary_eval(model):
        assert torch.isfinite(model(x)).all()


# ---- big timm models on the meta device ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, first, head",
    [
        ("resnet50", "conv1", "fc"),
        ("swin_tiny_patch4_window7_224", "patch_embed.proj", "head.fc"),
        ("vit_base_patch16_224", "patch_embed.proj", "head"),
    ],
)
def test_meta_models(name, first, head):
    with torch.device("meta"):
        model = models.create(name)
    layers = layers_of(model)
    total = sum(n_params(m) for m in layers.values())
    report = binarize_(model)
    assert set(report.kept) == {first, head}
    assert binarized_names(model) == set(layers) - {first, head}
    assert set(report.binarized) == set(layers) - {first, head}
    assert type(model.get_submodule(first)) is nn.Conv2d and type(model.get_submodule(head)) is nn.Linear
    kept = sum(r.params for r in report.rows if r.action != "binarized")
    assert report.binary_params + kept == total
    assert report.binary_params == sum(n_params(model.get_submodule(n)) for n in report.binarized)


def test_meta_swin_extra_layernorm():
    with torch.device("meta"):
        model = models.create("swin_tiny_patch4_window7_224")
    report = binarize_(model, {"extra_layernorm": True})
    assert len(report.added_norms) == 2 + 2 + 6 + 2  # one per Swin block
    assert all(n.endswith(".attn") for n in report.added_norms)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_pattern_matching_nothing(resnet20):
    with pytest.raises(ValueError, match="'layer9'"):
        binarize_(resnet20, {"include": ["layer9"]})
    with pytest.raises(ValueError, match=r"'blocks\.\*'"):
        binarize_(resnet20, {"exclude": ["blocks.*"]})
    assert not binarized_names(resnet20)


def test_include_of_a_batchnorm(resnet20):
    with pytest.raises(ValueError, match=r"bn1.*BatchNorm2d"):
        binarize_(resnet20, {"include": ["bn1"]})
    assert not binarized_names(resnet20)


def test_extra_layernorm_on_a_cnn(resnet20):
    with pytest.raises(ValueError, match="extra_layernorm"):
        binarize_(resnet20, {"extra_layernorm": True})


def test_failed_surgery_leaves_the_model_untouched(resnet20):
    # A refused spec must not leave a half-binarized model behind.
    with pytest.raises(ValueError):
        binarize_(resnet20, {"extra_layernorm": True})
    assert not binarized_names(resnet20)


def test_unknown_spec_key(resnet20):
    with pytest.raises(ValueError) as err:
        binarize_(resnet20, {"weights": "bnn++"})
    msg = str(err.value)
    assert "weights" in msg
    for key in (
        "weight",
        "activation",
        "scaling",
        "units",
        "accumulator_bits",
        "include",
        "exclude",
        "keep_first",
        "keep_head",
        "extra_layernorm",
        "activation_placement",
        "activation_guard",
    ):
        assert key in msg


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"scaling": "tensor"}, ["tensor", "none", "layer", "channel"]),
        ({"units": "bits"}, ["bits", "scaled", "raw"]),
        ({"accumulator_bits": 4}, ["4", "None", "8"]),
        ({"weight": "bnn+++"}, ["bnn+++", "bnn++", "bc"]),
        ({"activation": {"name": "bnn++", "nu": 3}}, ["nu", "mu"]),
        ({"activation_placement": "sign"}, ["sign", "threshold", "hardtanh", "pre_relu", "none"]),
        ({"activation_guard": "ignore"}, ["ignore", "error", "warn"]),
    ],
)
def test_bad_spec_values(resnet20, spec, words):
    with pytest.raises(ValueError) as err:
        binarize_(resnet20, spec)
    for w in words:
        assert w in str(err.value)
    assert not binarized_names(resnet20)


def test_spec_round_trips():
    spec = BinarizeSpec(
        weight={"name": "bnn++", "mu": 5.0},
        activation="react",
        include=["layer1", "layer2"],
        exclude="layer2.0.*",
        extra_layernorm=True,
        activation_placement="pre_relu",
        activation_guard="warn",
    )
    assert spec.exclude == ["layer2.0.*"]
    assert BinarizeSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("setting", [{"activation_placement": "hardtanh"}, {"activation_guard": "warn"}])
def test_activation_settings_without_activation_are_refused(setting):
    """BW has no binarized activations: their placement / guard would be ignored silently (new-user trial)."""
    with pytest.raises(ValueError) as err:
        BinarizeSpec(**setting)
    key, value = next(iter(setting.items()))
    assert f"{key}={value!r}" in str(err.value) and "activation is None" in str(err.value)
    assert BinarizeSpec(activation="bnn++", **setting).task == "BWA"


# ---- classifier heads and first layers named by timm's pretrained_cfg (issue 15 item 1) -------------------------


@pytest.mark.parametrize(
    "name, kw, firsts, heads",
    [
        ("deit_tiny_distilled_patch16_224", DEIT, {"patch_embed.proj"}, {"head", "head_dist"}),
        ("levit_128s", {}, {"stem.conv1.linear"}, {"head.linear", "head_dist.linear"}),
        ("repvit_m1", {}, {"stem.conv1.c"}, {"head.head.l", "head.head_dist.l"}),
        ("fastvit_t8", {}, {"stem.0.conv_kxk.0.conv", "stem.0.conv_scale.conv"}, {"head.fc"}),
        ("convnext_atto", {}, {"stem.0"}, {"head.fc"}),
        ("efficientnet_b0", {}, {"conv_stem"}, {"classifier"}),
        ("resnet18d", {}, {"conv1.0"}, {"fc"}),
        ("xcit_nano_12_p16_224", {}, {"patch_embed.proj.0.0"}, {"head"}),
        ("swin_tiny_patch4_window7_224", {}, {"patch_embed.proj"}, {"head.fc"}),
    ],
)
def test_every_named_classifier_and_first_layer_stays_full_precision(name, kw, firsts, heads):
    # pretrained_cfg["classifier"] / ["first_conv"]: one name, a nested name or a tuple of names.
    with torch.device("meta"):
        model = models.create(name, **kw)
    layers = layers_of(model)
    assert firsts | heads <= set(layers)
    report = binarize_(model)
    assert binarized_names(model) == set(layers) - firsts - heads
    actions = {r.name: r.action for r in report.rows}
    assert {n: actions[n] for n in firsts} == dict.fromkeys(firsts, "kept (first layer)")
    assert {n: actions[n] for n in heads} == dict.fromkeys(heads, "kept (head)")
    for n in firsts | heads:
        assert type(model.get_submodule(n)) in (nn.Conv2d, nn.Linear), n


def test_a_named_container_means_its_first_conv_and_last_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
            self.body = nn.Conv2d(8, 8, 3)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 4))
            self.aux = nn.Linear(8, 4)
            self.pretrained_cfg = {"first_conv": "stem", "classifier": ("head", "aux")}

    report = binarize_(Net())
    actions = {r.name: r.action for r in report.rows}
    assert actions["stem.0"] == "kept (first layer)" and actions["stem.2"] == "binarized"
    assert actions["head.2"] == "kept (head)" and actions["aux"] == "kept (head)"
    assert actions["head.1"] == "binarized" and actions["body"] == "binarized"


def test_a_headless_model_keeps_no_head():
    # num_classes=0: timm's head is an nn.Identity; no other layer stands in for it.
    with torch.device("meta"):
        model = models.create("vit_tiny_patch16_224", num_classes=0)
    report = binarize_(model)
    assert not [r for r in report.rows if r.action == "kept (head)"]
    assert [r.name for r in report.rows if r.action == "kept (first layer)"] == ["patch_embed.proj"]


def test_keep_flags_cover_every_named_head():
    model = models.create("deit_tiny_distilled_patch16_224", **DEIT)
    binarize_(model, {"keep_head": False})
    assert isinstance(model.head, BinaryLinear) and isinstance(model.head_dist, BinaryLinear)
    assert type(model.patch_embed.proj) is nn.Conv2d
