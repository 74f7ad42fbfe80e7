"""Signed-input layouts (pcpp.placement): "pre_relu" and "hardtanh" on the CIFAR ResNet-20, refused elsewhere.

The data flow is checked with hooks written here: which tensor each binarized conv and each shortcut
actually receives, against the ReLU modules' own inputs and outputs.
"""

import pytest
import torch
from torch import nn

import pcpp.layers as pl
from pcpp import models, placement
from pcpp.surgery import binarize_

pytestmark = pytest.mark.unit

BLOCKS = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
CONVS = [f"{b}.conv{k}" for b in BLOCKS for k in (1, 2)]


def feeding_relu(conv: str) -> str:
    """The ReLU module whose output the teacher's conv reads (written from the block diagram)."""
    block, k = conv.rsplit(".conv", 1)
    if k == "2":
        return f"{block}.relu1"
    i = BLOCKS.index(block)
    return "relu" if i == 0 else f"{BLOCKS[i - 1]}.relu2"


def record(model: nn.Module, names: list[str], what: str) -> tuple[dict, list]:
    seen, handles = {}, []
    for n in names:
        m = model.get_submodule(n)
        if what == "input":
            handles.append(m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach())))
        else:
            handles.append(m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0].detach(), o))))
    return seen, handles


@pytest.fixture
def resnet20():
    torch.manual_seed(0)
    return models.create("resnet20").eval()


def test_preact_path_equals_the_teacher_when_nothing_is_signed(resnet20):
    x = torch.randn(2, 3, 32, 32)
    expected = resnet20(x)
    for block in resnet20.layer1:
        block.signed_conv1 = False
    p = resnet20.bn1(resnet20.conv1(x))
    relu_in = resnet20.relu
    for _, block in resnet20.blocks():
        q = block.forward_preact(p, relu_in)
        torch.testing.assert_close(block.relu2(q), block(relu_in(p)), rtol=0, atol=0)
        p, relu_in = q, block.relu2
    torch.testing.assert_close(resnet20.linear(resnet20.pool(relu_in(p)).flatten(1)), expected, rtol=0, atol=0)


def test_pre_relu_binarized_convs_read_the_pre_activation(resnet20):
    binarize_(resnet20, {"weight": "fp", "activation": "fp", "scaling": "none", "activation_placement": "pre_relu"})
    stream = ["relu"] + [f"{b}.relu2" for b in BLOCKS]  # the ReLUs of the residual stream
    conv_in, h1 = record(resnet20, CONVS, "input")
    relu_io, h2 = record(resnet20, stream, "io")
    bn1_io, h3 = record(resnet20, [f"{b}.bn1" for b in BLOCKS], "io")
    shortcut_in, h4 = record(resnet20, [f"{b}.shortcut" for b in BLOCKS], "input")
    with torch.no_grad():
        resnet20(torch.randn(2, 3, 32, 32))
    for h in h1 + h2 + h3 + h4:
        h.remove()
    for conv in CONVS:
        block, k = conv.rsplit(".conv", 1)
        # the sign is taken before the ReLU: conv2 reads bn1's output, conv1 what the stream's ReLU receives
        pre = bn1_io[f"{block}.bn1"][1] if k == "2" else relu_io[feeding_relu(conv)][0]
        assert torch.equal(conv_in[conv], pre), conv
        assert (pre < 0).any(), conv
    for b in BLOCKS:  # full-precision paths keep the ReLU output
        assert torch.equal(shortcut_in[f"{b}.shortcut"], relu_io[feeding_relu(f"{b}.conv1")][1])
    assert all(type(m) is nn.ReLU for n, m in resnet20.named_modules() if "relu" in n)


def test_hardtanh_replaces_exactly_the_relus_feeding_binarized_convs(resnet20):
    teacher_keys = set(resnet20.state_dict())
    report = binarize_(resnet20, {"activation": "bnn++", "include": ["layer2"], "activation_placement": "hardtanh"})
    expected = {"layer1.2.relu2", "layer2.0.relu1", "layer2.0.relu2", "layer2.1.relu1", "layer2.1.relu2",
                "layer2.2.relu1"}  # layer2.2.relu2 feeds layer3.0.conv1, which stays full precision
    hardtanh = {n for n, m in resnet20.named_modules() if isinstance(m, nn.Hardtanh)}
    assert hardtanh == expected
    assert all(m.min_val == -1.0 and m.max_val == 1.0 for m in resnet20.modules() if isinstance(m, nn.Hardtanh))
    assert set(report.activation_layout["changed"]) == expected
    assert "signed inputs (hardtanh)" in str(report)
    assert set(resnet20.state_dict()) == teacher_keys  # no parameter added or renamed
    conv_in, hs = record(resnet20, [c for c in CONVS if c.startswith("layer2")], "input")
    with torch.no_grad():
        resnet20(torch.randn(2, 3, 32, 32))
    for h in hs:
        h.remove()
    for conv, x in conv_in.items():
        assert x.min() >= -1 and x.max() <= 1 and (x < 0).any(), conv


@pytest.mark.parametrize("chosen", ["hardtanh", "pre_relu"])
def test_a_placement_for_a_bw_model_is_refused_and_the_model_left_alone(resnet20, chosen):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=f"activation_placement='{chosen}' set without binarized activations"):
        binarize_(resnet20, {"activation_placement": chosen})  # BW: nothing to place (it was ignored silently)
    assert not any(isinstance(m, nn.Hardtanh) for m in resnet20.modules())
    assert list(pl.binary_layers(resnet20)) == []
    assert not any(b.signed_conv1 or b.signed_conv2 for _, b in resnet20.blocks())
    assert getattr(resnet20, "pcpp_activation_layout", {}) == {}
    assert resnet20(x).shape == (2, 10)


@pytest.mark.parametrize("chosen", ["hardtanh", "pre_relu"])
@pytest.mark.parametrize("name, kw", [
    ("resnet18", dict(layers=(1, 1, 1, 1))),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2)),
])
def test_layouts_are_refused_where_the_model_does_not_define_them(chosen, name, kw):
    model = models.create(name, num_classes=10, **kw)
    with pytest.raises(ValueError) as err:
        binarize_(model, {"activation": "bnn++", "activation_placement": chosen})
    msg = str(err.value)
    assert chosen in msg and type(model).__name__ in msg and "'threshold'" in msg
    assert not any(isinstance(m, pl.BinaryMixin) for m in model.modules())  # refused before any change


def test_unknown_placement_is_refused_with_the_valid_ones(resnet20):
    with pytest.raises(ValueError, match="'signed'.*threshold, hardtanh, pre_relu, none"):
        binarize_(resnet20, {"activation": "bnn", "activation_placement": "signed"})
    with pytest.raises(ValueError, match="threshold, hardtanh, pre_relu, none"):
        placement.check(resnet20, "signed")


def test_a_second_surgery_extends_the_layout_and_refuses_another_one(resnet20):
    binarize_(resnet20, {"activation": "bnn", "include": ["layer1"], "activation_placement": "pre_relu"})
    binarize_(resnet20, {"activation": "bnn", "include": ["layer3"], "activation_placement": "pre_relu"})
    signed = {f"{n}.conv{k}" for n, b in resnet20.blocks() for k in (1, 2) if getattr(b, f"signed_conv{k}")}
    assert signed == {c for c in CONVS if c.startswith(("layer1", "layer3"))}
    with pytest.raises(ValueError, match="already uses activation_placement 'pre_relu'"):
        binarize_(resnet20, {"activation": "bnn", "include": ["layer2"], "activation_placement": "hardtanh"})


@pytest.mark.parametrize("chosen", ["hardtanh", "pre_relu", "threshold"])
def test_binarized_checkpoint_loads_into_a_fresh_binarized_model(tmp_path, resnet20, chosen):
    spec = {"activation": "bnn++", "activation_placement": chosen}
    binarize_(resnet20, spec)
    with torch.no_grad():
        for _, m in pl.binary_layers(resnet20):
            if m.act_threshold is not None:
                m.act_threshold.normal_()
    torch.save(resnet20.state_dict(), tmp_path / "student.pt")
    fresh = models.create("resnet20")
    binarize_(fresh, spec)
    models.load_checkpoint(fresh, tmp_path / "student.pt", strict=True)
    x = torch.randn(2, 3, 32, 32)
    with pl.binary_eval(resnet20), pl.binary_eval(fresh):
        assert torch.equal(fresh(x), resnet20(x))


@pytest.mark.parametrize("name, kw, expected", [
    ("resnet20", {}, "hardtanh"),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2), "threshold"),
    ("resnet18", dict(layers=(1, 1, 1, 1)), "threshold"),
])
def test_auto_is_the_default_and_resolves_per_model(name, kw, expected):
    model = models.create(name, num_classes=10, **kw)
    report = binarize_(model, {"activation": "bnn++"})
    assert report.spec.activation_placement == "auto"
    assert report.activation_placement == expected == placement.resolve(model, "auto")
    assert f"activation_placement=auto -> {expected}" in str(report)
    layers = [m for _, m in pl.binary_layers(model)]
    assert {m.binary_config()["activation_placement"] for m in layers} == {expected}
    assert all((m.act_threshold is not None) == (expected == "threshold") for m in layers)
    assert (getattr(model, "pcpp_activation_layout", {}).get("placement")) == (
        expected if expected in placement.LAYOUTS else None)


def test_bw_records_no_placement(resnet20):
    report = binarize_(resnet20)
    assert report.activation_placement is None and "activation_placement" not in str(report)
    assert {m.activation_placement for _, m in pl.binary_layers(resnet20)} == {"none"}
