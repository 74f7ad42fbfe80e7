"""Per-channel activation thresholds (ReActNet's RSign) in the binarized layers, for every activation pair.

References are computed here from the definitions (docs/contracts.md, "Binarized layers and surgery":
the pair acts on x - beta, beta one entry per input channel, on dim -3 of a conv input and on
the last dim of a Linear input; forward F(x - beta), gradient B(x - beta) to x and -sum B(x - beta) to beta.
"""

import pytest
import torch
from torch import nn

from pcpp import models, quantizers
from pcpp.layers import BinaryConv2d, BinaryLinear, binary_eval
from pcpp.specs import make_quantizer
from pcpp.surgery import binarize_

pytestmark = pytest.mark.unit

PAIRS = quantizers.names()  # the registry, not a hand-kept list


def layer_and_input(kind: str, act, dtype=torch.float64, **spec):
    gen = torch.Generator().manual_seed(1)
    if kind == "conv":
        layer = BinaryConv2d(4, 3, 3, padding=1, weight_quantizer="fp", scaling="none", act_quantizer=act,
                             dtype=dtype, **spec)
        x = torch.randn(2, 4, 5, 5, generator=gen, dtype=dtype) * 1.5
        view = (1, -1, 1, 1)
    else:
        layer = BinaryLinear(4, 3, weight_quantizer="fp", scaling="none", act_quantizer=act, dtype=dtype, **spec)
        x = torch.randn(2, 6, 4, generator=gen, dtype=dtype) * 1.5  # (N, L, C) tokens
        view = (1, 1, -1)
    with torch.no_grad():
        layer.act_threshold.copy_(torch.tensor([0.3, -0.4, 1.1, 0.0], dtype=dtype))
    # exact zeros and points on the +-1 edges of x - beta, where B changes
    x.view(-1)[:4] = torch.tensor([0.3, -0.4, 2.1, -1.0], dtype=dtype)
    return layer, x, layer.act_threshold.detach().reshape(view)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", PAIRS)
def test_pair_acts_on_x_minus_beta(kind, name):
    layer, x, beta = layer_and_input(kind, name)
    q = make_quantizer(name, "activation")  # the layer's input pair, with the activation defaults
    x = x.requires_grad_(True)
    seen = {}
    op = layer._op
    layer._op = lambda a, w, b: (seen.setdefault("x", a), op(a, w, b))[1]
    out = layer(x)
    torch.testing.assert_close(seen["x"].detach(), q.F(x.detach() - beta), rtol=0, atol=1e-12)

    g = torch.randn_like(out)
    out.backward(g)
    # dL/d(op input), through the fp op with the fp weight; then the pair's backward factor
    g_in = _op_input_grad(layer, op, seen["x"].detach(), g)
    b = q.B(x.detach() - beta)
    torch.testing.assert_close(x.grad, g_in * b, rtol=1e-10, atol=1e-12)
    dims = tuple(d for d in range(x.dim()) if d != (1 if kind == "conv" else x.dim() - 1))
    torch.testing.assert_close(layer.act_threshold.grad, -(g_in * b).sum(dim=dims), rtol=1e-10, atol=1e-12)


def _op_input_grad(layer, op, a, g):
    a = a.clone().requires_grad_(True)
    op(a, layer.weight.detach(), None if layer.bias is None else layer.bias.detach()).backward(g)
    return a.grad


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", PAIRS)
def test_honest_activation_is_binarize_of_x_minus_beta(kind, name):
    layer, x, beta = layer_and_input(kind, name)
    seen = {}
    op = layer._op
    layer._op = lambda a, w, b: (seen.setdefault("x", a), op(a, w, b))[1]
    with binary_eval(layer):
        layer(x)
    expected = quantizers.get(name).binarize(x - beta)
    assert torch.equal(seen["x"], expected)
    if name != "fp":
        assert set(seen["x"].unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(seen["x"], torch.where(x - beta >= 0, 1.0, -1.0).double())


def test_token_thresholds_act_on_the_feature_dim():
    # issue 15 item 2: (3, 5, 8) raised, and a square (2, 8, 8) input shifted along the token axis.
    spec = {"name": "react", "learnable_beta": True, "channels": 8}
    layer = BinaryLinear(8, 4, weight_quantizer="fp", scaling="none", act_quantizer=spec)
    assert layer.act_threshold.shape == (8,)
    with torch.no_grad():
        layer.act_threshold.copy_(torch.linspace(-1, 1, 8))
    seen = {}
    op = layer._op
    layer._op = lambda a, w, b: (seen.setdefault("x", a), op(a, w, b))[1]
    for shape in [(3, 5, 8), (2, 8, 8), (8,), (4, 2, 3, 8)]:
        seen.clear()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with binary_eval(layer):
            assert layer(x).shape == shape[:-1] + (4,)
        expected = torch.where(x - torch.linspace(-1, 1, 8) >= 0, 1.0, -1.0)
        assert torch.equal(seen["x"], expected), shape


def test_conv_thresholds_act_on_the_channel_dim_batched_or_not():
    layer = BinaryConv2d(3, 2, 1, weight_quantizer="fp", scaling="none", act_quantizer="bnn")
    with torch.no_grad():
        layer.act_threshold.copy_(torch.tensor([-5.0, 0.0, 5.0]))
    x = torch.randn(3, 3, 3)  # unbatched (C, H, W): the channel dim is 0, not 1
    seen = {}
    op = layer._op
    layer._op = lambda a, w, b: (seen.setdefault("x", a), op(a, w, b))[1]
    with binary_eval(layer):
        layer(x)
    assert seen["x"][0].eq(1).all() and seen["x"][2].eq(-1).all()


@pytest.mark.parametrize("cls, args, channels", [(BinaryConv2d, (16, 8, 3), 16), (BinaryLinear, (12, 5), 12)])
def test_threshold_is_sized_from_the_layer(cls, args, channels):
    layer = cls(*args, act_quantizer={"name": "react", "learnable_beta": True})
    assert layer.act_threshold.shape == (channels,)
    assert layer.binary_config()["act_threshold"] is True
    # the pair no longer carries its own beta: the shift is applied once, by the layer
    assert layer.act_quantizer.beta is None and not any("act_quantizer" in n for n, _ in layer.named_parameters())
    with pytest.raises(ValueError, match=rf"channels={channels + 1}.*{channels} channels"):
        cls(*args, act_quantizer={"name": "react", "learnable_beta": True, "channels": channels + 1})


def test_react_beta_initialises_the_threshold():
    layer = BinaryLinear(3, 2, act_quantizer={"name": "react", "learnable_beta": True, "beta": 0.25})
    assert layer.act_threshold.tolist() == [0.25] * 3


@pytest.mark.parametrize("placement, has", [("threshold", True), ("hardtanh", False), ("pre_relu", False),
                                            ("none", False)])
def test_placement_decides_the_threshold(placement, has):
    layer = BinaryConv2d(3, 4, 3, act_quantizer="bnn++", activation_placement=placement)
    assert (layer.act_threshold is not None) is has
    assert layer.binary_config()["activation_placement"] == placement
    assert BinaryConv2d(3, 4, 3, activation_placement=placement).act_threshold is None  # BW: nothing to shift


def test_threshold_needs_an_activation_pair():
    with pytest.raises(ValueError, match="act_threshold=True needs an activation quantizer"):
        BinaryLinear(3, 2, act_threshold=True)
    with pytest.raises(ValueError, match="valid: threshold, hardtanh, pre_relu, none"):
        BinaryLinear(3, 2, act_quantizer="bnn", activation_placement="sign")


def test_binarize_refuses_a_react_spec_that_cannot_fit_naming_the_layer():
    # issue 15 item 2: accepted before, then failed in forward (ResNet-20 has 16, 32 and 64 input channels).
    model = models.create("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2 \(Conv2d\).*channels=16.*32 channels"):
        binarize_(model, {"activation": {"name": "react", "learnable_beta": True, "channels": 16}})
    assert not any(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_binarize_sizes_react_thresholds_per_layer_and_runs():
    model = models.create("resnet20")
    binarize_(model, {"activation": {"name": "react", "learnable_beta": True}})
    sizes = {n: m.act_threshold.shape[0] for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    assert sizes == {n: m.in_channels for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(m.act_threshold.grad is not None for m in model.modules() if isinstance(m, BinaryConv2d))


def test_vit_token_layers_get_feature_thresholds():
    model = models.create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2,
                          num_classes=10)
    binarize_(model, {"activation": "bnn++"})
    for name, m in model.named_modules():
        if isinstance(m, BinaryLinear):
            assert m.act_threshold.shape == (m.in_features,), name
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert isinstance(model.blocks[0].mlp.fc2, nn.Linear)
