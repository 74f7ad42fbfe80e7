"""Binarized layers in float16 and bfloat16 (issue 15 item 3; DeepSpeed trains in fp16 on V100).

Every floor and clamp must be representable in the dtype in use: a fixed 1e-8 underflows to 0 in fp16,
so a dead output channel got scale 0, w / s NaN, NaN outputs and gradients. The integer accumulators of
BWAA must stay exact: float16 holds integers exactly only up to 2048, bfloat16 up to 256.
"""

import numpy as np
import pytest
import torch

import pcpp.layers as pl
from pcpp import quantizers, tasks
from pcpp.layers import BinaryConv2d, BinaryLinear, binary_eval

pytestmark = pytest.mark.unit

DTYPES = [torch.float16, torch.bfloat16]


def dead_layer(kind: str, dtype, all_zero: bool = False, **spec):
    """A layer with output channel 1 all zero (or every weight zero), cast to `dtype`, and an input with a
    dead (all-zero) channel 0."""
    torch.manual_seed(0)
    if kind == "conv":
        layer = BinaryConv2d(4, 3, 3, padding=1, **spec)
        x = torch.randn(2, 4, 5, 5)
        x[:, 0] = 0
    else:
        layer = BinaryLinear(6, 3, bias=False, **spec)
        x = torch.randn(2, 5, 6)
        x[..., 0] = 0
    with torch.no_grad():
        layer.weight.mul_(0.05)  # trained-network magnitudes
        layer.weight[1] = 0
        if all_zero:
            layer.weight.zero_()
    return layer.to(dtype), x.to(dtype)


def forward_backward(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.float().square().sum().backward()
    return out, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("scaling", ["none", "layer", "channel"])
@pytest.mark.parametrize("units", ["scaled", "raw"])
@pytest.mark.parametrize("task", tasks.TASKS)
def test_dead_channels_give_finite_outputs_and_gradients(dtype, kind, scaling, units, task):
    for all_zero in (False, True):
        layer, x = dead_layer(kind, dtype, all_zero, scaling=scaling, units=units, **tasks.layer_kwargs(task))
        assert layer.weight.dtype == dtype
        if layer.act_threshold is not None:
            assert layer.act_threshold.dtype == dtype
        s = layer.weight_scale()
        assert s.dtype == dtype and (s > 0).all(), s  # never 0: w / s stays finite
        out, gx = forward_backward(layer, x)
        assert out.dtype == dtype
        assert torch.isfinite(out).all() and torch.isfinite(gx).all()
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        with binary_eval(layer):
            assert torch.isfinite(layer(x)).all()
        if scaling != "none":  # the honest dead channel is s sign(0) = +s: small, not NaN
            signs, scale = layer.binary_weight()
            assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue_example_channel_scaling_with_a_zero_channel(dtype):
    layer = BinaryLinear(6, 3, bias=False, scaling="channel")
    with torch.no_grad():
        layer.weight[1] = 0
    layer = layer.to(dtype)
    assert layer.weight_scale()[1].item() == torch.finfo(dtype).tiny
    out, gx = forward_backward(layer, torch.randn(4, 6, dtype=dtype))
    assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("name", quantizers.names())
def test_every_pair_is_finite_in_half_precision(dtype, role, name):
    spec = {"weight_quantizer": name} if role == "weight" else {"act_quantizer": name}
    for progress in (0.0, 0.5, 1.0):
        layer, x = dead_layer("linear", dtype, scaling="channel", **spec)
        pl.set_progress(layer, progress)
        out, gx = forward_backward(layer, x)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all(), progress
        assert torch.isfinite(layer.weight.grad).all(), progress


@pytest.mark.parametrize("dtype, fan_in", [(torch.float16, 6145), (torch.bfloat16, 577)])
def test_bwaa_accumulators_are_exact_integers_in_half_precision(dtype, fan_in):
    # Mostly-positive signs put the (odd) sums near 0.4 fan_in: past 2048 (float16's last exact integer) and
    # 256 (bfloat16's), where a sum in the layer's dtype is rounded before the wrap.
    torch.manual_seed(0)
    layer = BinaryLinear(fan_in, 32, bias=False, act_quantizer="bnn", accumulator_bits=8,
                         activation_placement="none", scaling="layer")
    with torch.no_grad():
        layer.weight.add_(layer.weight.abs().mean())
    layer = layer.to(dtype)
    x = (torch.rand(16, fan_in) - 0.1).to(dtype)
    with binary_eval(layer):
        out = layer(x)
    signs_x = np.where(x.float().numpy() >= 0, 1, -1).astype(np.int64)
    signs_w = np.where(layer.weight.detach().float().numpy() >= 0, 1, -1).astype(np.int64)
    sums = signs_x @ signs_w.T
    assert np.abs(sums).max() > (2048 if dtype == torch.float16 else 256)
    acc = sums.astype(np.int8).astype(np.float64)  # two's-complement wrap, as integers
    expected = torch.from_numpy(acc * float(layer.weight_scale())).to(dtype)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_counts_survive_half(dtype):
    torch.manual_seed(0)
    ref = BinaryLinear(512, 64, act_quantizer="bnn", accumulator_bits=8, activation_placement="none")
    half = BinaryLinear(512, 64, act_quantizer="bnn", accumulator_bits=8, activation_placement="none")
    with torch.no_grad():
        ref.weight.add_(0.3 * ref.weight.abs().mean())  # mostly +1 signs: sums near 2^7, about half overflow
    half.load_state_dict(ref.state_dict())
    half = half.to(dtype)
    x = torch.rand(300, 512) - 0.1
    with binary_eval(ref), binary_eval(half):  # counters read inside: an evaluation's are restored on exit
        for _ in range(3):  # 3 * 300 * 64 = 57,600 accumulators: past fp16's exact integers
            ref(x)
            half(x.to(dtype))
        assert half.accumulator_count.dtype == torch.int64
        assert int(half.accumulator_count) == int(ref.accumulator_count) == 3 * 300 * 64
        assert int(half.overflow_count) == int(ref.overflow_count) > 0
        assert half.overflow_rate == ref.overflow_rate


def test_bwaa_in_float64_stays_float64():
    layer = BinaryLinear(8, 3, act_quantizer="bnn", accumulator_bits=8, dtype=torch.float64)
    out = layer(torch.randn(2, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
