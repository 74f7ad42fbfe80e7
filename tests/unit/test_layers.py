"""Binarized layers (pcpp.layers) against their torch twins and references computed here from the definitions.

References are written from docs/contracts.md ("Binarized layers and surgery") and the paper's eq. (7): with a scale s,
a weight pair acts in units of s (output s F(w*/s), gradient B(w*/s)); honest mode is s sign(w*) with
sign(0) = +1; BWAA wraps the integer dot products of +-1 operands to 8-bit two's complement.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pcpp.layers as pl
from pcpp import quantizers
from pcpp.layers import BinaryConv2d, BinaryLinear, binary_eval

pytestmark = pytest.mark.unit

SCALED = ("layer", "channel")


def ref_sign(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def ref_scale(w: torch.Tensor, scaling: str) -> torch.Tensor:
    if scaling == "none":
        return torch.ones((), dtype=w.dtype)
    if scaling == "layer":
        return w.abs().mean()
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


def make_pair(kind: str, **spec):
    """A binarized layer and its torch twin holding the same parameters."""
    torch.manual_seed(0)
    if kind == "conv":
        twin = nn.Conv2d(3, 6, 3, padding=1, stride=2, bias=True)
        layer = BinaryConv2d.from_float(twin, **spec)
        x = torch.randn(2, 3, 9, 9)
    else:
        twin = nn.Linear(7, 5)
        layer = BinaryLinear.from_float(twin, **spec)
        x = torch.randn(4, 7)
    return layer, twin, x


def capture_op(layer):
    """Replace the instance's `_op` so the (input, weight) actually reaching the torch op are recorded."""
    seen = {}
    op = layer._op

    def wrapper(x, w, bias):
        seen["x"], seen["w"] = x.detach().clone(), w.detach().clone()
        return op(x, w, bias)

    layer._op = wrapper
    return seen


def ref_wrap(z) -> np.ndarray:
    """Two's-complement 8-bit wrap done by the integer hardware: numpy's int64 -> int8 cast."""
    return np.array(z, dtype=np.int64).astype(np.int8).astype(np.int64)


# ---- full-precision pair: the layer is its twin --------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fp_no_scaling_equals_twin_exactly(kind):
    layer, twin, x = make_pair(kind, weight_quantizer="fp", scaling="none")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), twin(x2)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(layer.weight.grad, twin.weight.grad)
    assert torch.equal(layer.bias.grad, twin.bias.grad)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("scaling", SCALED)
def test_fp_scaled_equals_twin(kind, scaling):
    layer, twin, x = make_pair(kind, weight_quantizer="fp", scaling=scaling)
    y, y_ref = layer(x), twin(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad, rtol=0, atol=1e-6)


# ---- BinaryConnect weights: s sign(w*) -------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["none", "layer", "channel"])
def test_bc_conv_is_scaled_sign(scaling):
    layer, twin, x = make_pair("conv", weight_quantizer="bc", scaling=scaling)
    w = twin.weight.detach()
    ref = F.conv2d(x, ref_sign(w) * ref_scale(w, scaling), twin.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scaling", ["none", "layer", "channel"])
def test_bc_linear_is_scaled_sign(scaling):
    layer, twin, x = make_pair("linear", weight_quantizer="bc", scaling=scaling)
    w = twin.weight.detach()
    ref = F.linear(x, ref_sign(w) * ref_scale(w, scaling), twin.bias)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-6)


def test_channel_scale_is_per_output_channel():
    layer, _, _ = make_pair("conv", weight_quantizer="bc", scaling="channel")
    with torch.no_grad():
        layer.weight[2].mul_(10.0)  # one channel much larger: its own scale, the others unchanged
    s = layer.weight_scale()
    assert s.shape == (6, 1, 1, 1)
    torch.testing.assert_close(s.reshape(-1), layer.weight.detach().abs().mean(dim=(1, 2, 3)))


# ---- honest (binarized-eval) mode -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("act", ["bnn++", "bnn", "bc", "react"])
def test_bwa_binary_eval_activations_are_pm1(kind, act):
    layer, _, x = make_pair(kind, weight_quantizer="bnn++", act_quantizer=act)
    x = x.clone()
    x.view(-1)[:5] = 0.0  # exact zeros must become +1
    seen = capture_op(layer)
    with binary_eval(layer):
        layer(x)
    assert set(seen["x"].unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(seen["x"], ref_sign(x))
    # training mode: the activation pair's forward (SS for bnn++) is what reaches the op
    layer(x)
    if act == "bnn++":
        assert not set(seen["x"].unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("scaling", ["none", "layer", "channel"])
@pytest.mark.parametrize("units", ["scaled", "raw"])
@pytest.mark.parametrize("weight", ["bnn++", "pc", "ede+"])
def test_honest_weights_are_s_sign(kind, scaling, units, weight):
    layer, twin, x = make_pair(kind, weight_quantizer=weight, scaling=scaling, units=units)
    seen = capture_op(layer)
    with binary_eval(layer):
        layer(x)
    w = twin.weight.detach()
    assert torch.equal(seen["w"], ref_scale(w, scaling) * ref_sign(w))


def test_binary_eval_restores_training_and_honest_flags():
    torch.manual_seed(0)
    model = nn.Sequential(BinaryLinear(4, 4), nn.ReLU(), BinaryLinear(4, 4), nn.Dropout(0.5))
    model[2].honest = True  # someone set one layer honest by hand: it must stay so
    model.train()
    with binary_eval(model) as m:
        assert m is model
        assert not model.training and not model[0].training
        assert model[0].honest and model[2].honest
    assert model.training and model[0].training and model[3].training
    assert model[0].honest is False and model[2].honest is True

    model.eval()
    with binary_eval(model):
        pass
    assert not model.training


def test_binary_eval_restores_after_exception():
    model = nn.Sequential(BinaryLinear(4, 4)).train()
    with pytest.raises(RuntimeError, match="boom"), binary_eval(model):
        raise RuntimeError("boom")
    assert model.training and model[0].honest is False


def test_binary_eval_restores_each_module_training_mode():
    # Fine-tuning often keeps some submodules (frozen BatchNorm) in eval while the model trains;
    # leaving the context must give back exactly the modes it found, module by module.
    model = nn.Sequential(BinaryLinear(4, 4), nn.BatchNorm1d(4), BinaryLinear(4, 4)).train()
    model[1].eval()
    before = {name: m.training for name, m in model.named_modules()}
    with binary_eval(model):
        pass
    after = {name: m.training for name, m in model.named_modules()}
    assert after == before


def test_set_progress_reaches_every_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(
        BinaryConv2d(3, 4, 3, act_quantizer="bnn++"),
        nn.Flatten(),
        nn.Sequential(BinaryLinear(4, 4, weight_quantizer="pc", act_quantizer="ede+")),
    )
    qs = [m for m in model.modules() if isinstance(m, quantizers.Quantizer)]
    assert len(qs) == 4
    pl.set_progress(model, 0.6)
    assert all(q.progress == 0.6 for q in qs)
    # bnn++'s defaults: log-linear 1.25 -> 30.4 on weights, 0.5 -> 10 on activations (pcpp.specs)
    assert model[0].weight_quantizer.params["mu"] == pytest.approx(1.25 * (30.4 / 1.25) ** 0.6)
    assert model[0].act_quantizer.params["mu"] == pytest.approx(0.5 * 20.0 ** 0.6)
    assert model[2][0].weight_quantizer.params["rho"] == pytest.approx(0.01 + 0.6 * (10 - 0.01))


def test_layers_do_not_share_a_quantizer_instance():
    # make_quantizer promises a copy of a Quantizer passed in; sharing one would tie the layers'
    # schedules together; each layer owns its own activation threshold.
    q = quantizers.get("bnn++", mu=7.0)
    a, b = BinaryLinear(4, 4, act_quantizer=q), BinaryLinear(4, 4, act_quantizer=q)
    assert a.act_quantizer is not b.act_quantizer
    assert a.act_quantizer.state() == q.state()
    assert a.act_threshold is not b.act_threshold


# ---- scale convention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("units", ["scaled", "raw"])
@pytest.mark.parametrize("scaling", SCALED)
def test_gradient_reaching_latent_weight(units, scaling):
    torch.manual_seed(0)
    layer = BinaryLinear(6, 5, bias=False, weight_quantizer="bnn++", scaling=scaling, units=units)
    layer.weight_quantizer.set_progress(0.3)
    q = quantizers.get("bnn++").set_progress(0.3)
    x = torch.randn(8, 6)
    g_out = torch.randn(8, 5)
    layer(x).backward(g_out)

    w = layer.weight.detach()
    s = ref_scale(w, scaling)
    g_eff = g_out.T @ x  # dL/d(effective weight), the op's upstream gradient
    if units == "scaled":
        # output s F(w*/s): d/dw* = g_eff * s * B(w*/s) / s = g_eff * B(w*/s)
        expected = g_eff * q.B(w / s)
        forward = s * q.F(w / s)
    else:
        # output s F(w*): the pair's output receives s * g_eff, and eq. (7) multiplies by B(w*)
        expected = (s * g_eff) * q.B(w)
        forward = s * q.F(w)
    torch.testing.assert_close(layer.effective_weight().detach(), forward)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_scaled_units_thresholds_are_relative_to_s():
    # BNN's B = 1[|w| <= 1] in units of s: weights beyond s (not beyond 1) get no gradient.
    layer = BinaryLinear(4, 1, bias=False, weight_quantizer="bnn", scaling="layer")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.6]]))  # s = 0.3
    layer(torch.ones(1, 4)).sum().backward()
    assert layer.weight.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]


# ---- BWAA: 8-bit accumulators ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_wrap_integer_matches_int8_cast(dtype):
    z = np.arange(-300, 301)
    got = pl.wrap_integer(torch.tensor(z, dtype=dtype), 8)
    assert got.tolist() == ref_wrap(z).tolist()
    assert got.min() == -128 and got.max() == 127


def bwaa_operands(n_out=16, n_in=512):
    """+-1 operands whose dot products span [-512, 512], so overflow happens in both directions."""
    gen = torch.Generator().manual_seed(0)
    frac_pos = torch.linspace(0.0, 1.0, n_out).unsqueeze(1)
    w = torch.where(torch.rand(n_out, n_in, generator=gen) < frac_pos, 1.0, -1.0)
    w = w * (0.5 + torch.rand(n_out, n_in, generator=gen))  # latent magnitudes vary, signs fixed
    x = torch.randn(6, n_in, generator=gen)
    x[:3] = x[:3].abs()  # all-positive rows: the dot product is (#pos - #neg) of each weight row
    x[0, :10] = 0.0  # sign(0) = +1
    return x, w


def test_bwaa_linear_wraps_integer_dot_products():
    x, w = bwaa_operands()
    layer = BinaryLinear(
        512, 16, bias=False, weight_quantizer="bc", act_quantizer="bc", scaling="none", accumulator_bits=8
    )
    with torch.no_grad():
        layer.weight.copy_(w)
    model = nn.Sequential(layer)
    acc = ref_sign(x).long().numpy() @ ref_sign(w).long().numpy().T  # exact int64 accumulators
    assert (acc > 127).any() and (acc < -128).any(), "the test needs overflow in both directions"
    outside = float(((acc < -128) | (acc > 127)).mean())
    with binary_eval(model):  # the counters of an evaluation: read inside it (restored on exit)
        out = model(x)
        assert layer.overflow_rate == pytest.approx(outside, abs=1e-12)
        assert pl.overflow_rates(model) == {"0": pytest.approx(outside, abs=1e-12)}
        assert pl.overflow_rates(model, reset=True)["0"] > 0
        assert pl.overflow_rates(model) == {"0": 0.0}
    assert out.tolist() == ref_wrap(acc).astype(np.float32).tolist()
    model.train()  # training steps count, and stay counted
    model(x)
    assert pl.overflow_rates(model) == {"0": pytest.approx(outside, abs=1e-12)}  # the same signs in training


@pytest.mark.parametrize("scaling", SCALED)
def test_bwaa_scale_and_bias_come_after_the_wrap(scaling):
    x, w = bwaa_operands()
    layer = BinaryLinear(512, 16, weight_quantizer="bc", act_quantizer="bc", scaling=scaling, accumulator_bits=8)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.uniform_(-1, 1)
    with binary_eval(layer):
        out = layer(x)
    acc = ref_sign(x).long().numpy() @ ref_sign(w).long().numpy().T
    s = ref_scale(w, scaling).reshape(-1)
    expected = torch.tensor(ref_wrap(acc), dtype=torch.float32) * s + layer.bias.detach()
    torch.testing.assert_close(out, expected)


def test_bwaa_conv_overflow_rate_counted():
    torch.manual_seed(0)
    layer = BinaryConv2d(
        64, 4, 3, padding=1, bias=False, weight_quantizer="bc", act_quantizer="bc", scaling="none", accumulator_bits=8
    )
    with torch.no_grad():
        layer.weight.abs_()  # all +1: a 3x3x64 window of +1 activations sums to 576
    x = torch.rand(2, 64, 5, 5)
    ref = F.conv2d(torch.ones_like(x), torch.ones_like(layer.weight), padding=1)
    with binary_eval(layer):
        out = layer(x)
        assert layer.overflow_rate == pytest.approx(float((ref > 127).double().mean()))
    assert out.tolist() == ref_wrap(ref.long().numpy()).astype(np.float32).tolist()
    assert layer.overflow_rate == 0.0  # the evaluation's counts end with it


def test_bwaa_gradient_passes_through_wrap():
    torch.manual_seed(0)
    layer = BinaryLinear(512, 4, weight_quantizer="bc", act_quantizer="bc", scaling="none", accumulator_bits=8)
    x = torch.randn(3, 512, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_accumulator_bits_need_an_activation_quantizer():
    with pytest.raises(ValueError, match="activation quantizer"):
        BinaryLinear(4, 4, accumulator_bits=8)
    with pytest.raises(ValueError, match="activation quantizer"):
        BinaryConv2d(3, 4, 3, accumulator_bits=8)


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_args", [(BinaryLinear, (4, 4)), (BinaryConv2d, (3, 4, 3))])
@pytest.mark.parametrize(
    "kwargs, valid",
    [
        ({"scaling": "tensor"}, ["none", "layer", "channel"]),
        ({"units": "bits"}, ["scaled", "raw"]),
        ({"accumulator_bits": 4, "act_quantizer": "bc"}, ["None", "8"]),
        ({"weight_quantizer": "bnn+++"}, None),
        ({"act_quantizer": "sgn"}, None),
    ],
)
def test_bad_settings_list_valid_values(cls_args, kwargs, valid):
    cls, args = cls_args
    with pytest.raises(ValueError) as err:
        cls(*args, **kwargs)
    msg = str(err.value)
    assert "valid" in msg
    for v in valid or quantizers.names():
        assert v in msg


def test_weight_quantizer_none_refused():
    with pytest.raises(ValueError, match="fp"):
        BinaryLinear(4, 4, weight_quantizer=None)


def test_from_float_refuses_other_types():
    with pytest.raises(ValueError, match="Conv1d"):
        BinaryConv2d.from_float(nn.Conv1d(3, 4, 3))
    with pytest.raises(ValueError, match="Bilinear"):
        BinaryLinear.from_float(nn.Bilinear(3, 3, 4))


# ---- conversions and diagnostics -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("scaling", ["layer", "channel"])
def test_from_float_to_float_round_trip(kind, scaling):
    layer, twin, x = make_pair(kind, weight_quantizer="bnn++", scaling=scaling)
    assert list(dict(layer.named_parameters())) == list(dict(twin.named_parameters()))
    back = layer.to_float()
    assert type(back) is type(twin)
    assert torch.equal(back.weight, twin.weight) and torch.equal(back.bias, twin.bias)
    assert torch.equal(back(x), twin(x))

    binarized = layer.to_float(binarized=True)
    w = twin.weight.detach()
    assert torch.equal(binarized.weight, ref_scale(w, scaling) * ref_sign(w))
    assert torch.equal(binarized.bias, twin.bias)
    with binary_eval(layer):
        torch.testing.assert_close(layer(x), binarized(x), rtol=0, atol=1e-6)


def test_from_float_keeps_conv_geometry_and_mode():
    conv = nn.Conv2d(
        4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=False, padding_mode="circular"
    ).eval()
    b = BinaryConv2d.from_float(conv, weight_quantizer="fp", scaling="none")
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(b, attr) == getattr(conv, attr)
    assert b.bias is None and not b.training
    x = torch.randn(1, 4, 7, 9)
    assert torch.equal(b(x), conv(x))


@pytest.mark.parametrize("spec", [{}, {"act_quantizer": "bnn++", "activation_placement": "pre_relu"},
                                  {"act_quantizer": "bnn++", "accumulator_bits": 8, "activation_placement": "none"}])
def test_teacher_style_state_dict_loads_as_is(spec):
    twin = nn.Linear(5, 3)
    layer = BinaryLinear(5, 3, **spec)
    assert set(layer.state_dict()) == set(twin.state_dict())
    layer.load_state_dict(twin.state_dict(), strict=True)


def test_a_threshold_is_the_one_extra_key():
    # BWA with a threshold adds exactly `act_threshold`: a binarized checkpoint carries it; a teacher
    # checkpoint is loaded before surgery (FT), where the key does not exist yet.
    twin = nn.Linear(5, 3)
    layer = BinaryLinear(5, 3, act_quantizer="bnn++", accumulator_bits=8)
    assert set(layer.state_dict()) == set(twin.state_dict()) | {"act_threshold"}
    with torch.no_grad():
        layer.act_threshold.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5]))
    fresh = BinaryLinear(5, 3, act_quantizer="bnn++", accumulator_bits=8)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(fresh.act_threshold, layer.act_threshold)


def test_soft_fraction_bc_is_zero():
    layer, _, _ = make_pair("conv", weight_quantizer="bc")
    assert layer.soft_fraction() == 0.0
    assert pl.soft_fraction(nn.Sequential(layer)) == 0.0


@pytest.mark.parametrize("units", ["scaled", "raw"])
def test_soft_fraction_bnn_pp_at_start_is_high(units):
    torch.manual_seed(0)
    layer = BinaryLinear(64, 32, weight_quantizer={"name": "bnn++", "mu": 5.0}, units=units)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)  # small weights, as in a trained network
    layer.weight_quantizer.set_progress(0.0)
    assert layer.soft_fraction() > 0.5
    assert pl.soft_fraction(nn.Sequential(layer, BinaryLinear(32, 2, weight_quantizer="bc"))) > 0.5
    with binary_eval(layer):
        assert layer.soft_fraction() == 0.0  # the honest forward is binary by construction


def test_soft_fraction_is_weighted_by_layer_size():
    torch.manual_seed(0)
    soft = BinaryLinear(30, 10, weight_quantizer="fp")  # 300 weights, almost all soft
    hard = BinaryLinear(10, 10, weight_quantizer="bc")  # 100 weights, none soft
    f = soft.soft_fraction()
    assert pl.soft_fraction(nn.Sequential(soft, hard)) == pytest.approx(f * 300 / 400)


def test_old_module_name_warns_once_and_reexports(monkeypatch):
    import importlib
    import sys
    import warnings

    monkeypatch.delitem(sys.modules, "pcpp.nn", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("pcpp.nn")
        importlib.import_module("pcpp.nn")  # cached: no second warning
        from pcpp.nn import BinaryConv2d as OldConv  # noqa: F401
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert [str(w.message) for w in deprecations] == [
        "pcpp.nn is now pcpp.layers; the old name goes in the next release"]
    assert OldConv is BinaryConv2d and old.binary_eval is binary_eval and old._copy_params is pl._copy_params
    assert {"BinaryConv2d", "BinaryLinear", "binary_layers", "set_progress", "scale_of"} <= set(old.__all__)
    with pytest.raises(AttributeError, match="pcpp.layers"):
        old.no_such_name  # noqa: B018
