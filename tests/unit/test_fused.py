"""Fused kernels (pcpp.kernels, pcpp.quantizers.fused, pcpp.accumulators.wrap_scale) against the reference path.

The reference path (PCPP_FUSED=0) composes each step from separate autograd ops, the code before fusion: it is
the ground truth. Every registered pair, at several progress values, as a weight pair (scaled and raw units,
layer and channel scales), as an activation pair (with and without a threshold), and BWAA layers' wrapped
outputs: outputs and gradients agree to 1e-6 (fp32; relative to the tensor's largest magnitude, which reaches
30 for bnn++'s B at mu = 30). Inputs include exact zeros and the clip points +-1 (and +-s).

The eager fused kernels run here at every size. The compiled ones (torch.compile: seconds per kernel, a minute
cold on 2 busy cores) are checked in tests/integration/test_fused_compiled.py with these helpers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcpp import kernels, quantizers
from pcpp.accumulators import wrap_by_floor, wrap_integer
from pcpp.layers import BinaryConv2d, BinaryLinear, set_progress
from pcpp.quantizers import fused

pytestmark = pytest.mark.unit

PROGRESS = (0.0, 0.37, 1.0)
TOL = 1e-6


def close(got: torch.Tensor, ref: torch.Tensor, what: str, exact: torch.Tensor | None = None) -> None:
    """got == ref to TOL relative to ref's largest magnitude; with `exact` (the reference in float64), plus twice
    the reference's own float32 rounding error (see test_compiled_pairs_equal_reference)."""
    atol = TOL * (max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0)
    if exact is not None:
        atol += 2.0 * float((ref.double() - exact).abs().max())
    torch.testing.assert_close(got, ref, rtol=TOL, atol=atol, msg=lambda m: f"{what}: {m}")


def as_double(v):
    return None if v is None else v.double()


SPECIAL = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0])  # zeros and clip points


def latent(shape, seed=0, shift=None) -> torch.Tensor:
    """Random values whose first entries minus `shift` are exactly SPECIAL (shift is dyadic: exact sums)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 1.5
    offset = torch.zeros(shape) if shift is None else shift.expand(shape)
    x.view(-1)[: SPECIAL.numel()] = SPECIAL + offset.reshape(-1)[: SPECIAL.numel()]
    return x


def run_case(mode, q, x, shift=None, scale=None, out_scale=None):
    """(output, grad x, grad shift) of q.apply_pair under a kernels mode, for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    shift = None if shift is None else shift.detach().clone().requires_grad_()
    with kernels.using(mode):
        y = q.apply_pair(x, shift=shift, scale=scale, out_scale=out_scale)
        g = torch.linspace(-1.0, 2.0, y.numel(), dtype=y.dtype).reshape(y.shape)
        y.backward(g)
    return y.detach(), x.grad, None if shift is None else shift.grad


CASES = {  # name -> (x shape, shift shape, scale, out_scale)
    "plain": ((3, 4, 5, 5), None, None, None),
    "threshold_conv": ((3, 4, 5, 5), (4, 1, 1), None, None),
    "threshold_tokens": ((2, 6, 8), (8,), None, None),
    "weight_scaled": ((6, 4, 3, 3), None, "layer", "layer"),
    "weight_raw": ((6, 4, 3, 3), None, None, "layer"),
    "weight_channel": ((6, 4, 3, 3), None, "channel", "channel"),
}


def scale_of(x: torch.Tensor, kind):
    if kind is None:
        return None
    return x.abs().mean() if kind == "layer" else x.abs().mean(dim=(1, 2, 3), keepdim=True)


def case_inputs(case):
    xshape, sshape, scale, out_scale = CASES[case]
    shift = None if sshape is None else torch.round(torch.randn(sshape, generator=torch.Generator().manual_seed(1))
                                                    * 2.0) / 8.0
    x = latent(xshape, shift=shift)
    if out_scale is not None:  # weights: a typical scale, and the first ones exactly at 0, s, -s
        x = x * 0.1
        s = float(scale_of(x, out_scale).reshape(-1)[0])
        x.view(-1)[:3] = torch.tensor([0.0, s, -s])
    return x, shift, scale_of(x, scale), scale_of(x, out_scale)


def compare(q, case, mode):
    x, shift, scale, out_scale = case_inputs(case)
    ref = run_case("reference", q, x, shift, scale, out_scale)
    got = run_case(mode, q, x, shift, scale, out_scale)
    exact = [None] * 3
    if mode != "eager":  # compiled: its own (equally valid) roundings; measure the reference's
        exact = run_case("reference", q, *map(as_double, (x, shift, scale, out_scale)))
    for what, r, g, e in zip(("output", "grad x", "grad shift"), ref, got, exact, strict=True):
        if r is None:
            assert g is None, what
        else:
            close(g, r, f"{q.name} {case} progress {q.progress} {what}", e)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", quantizers.names())
def test_eager_fused_pair_equals_reference(name, case):
    q = quantizers.get(name)
    for p in PROGRESS:
        compare(q.set_progress(p), case, "eager")


def _no_backward(w, **params):
    raise AssertionError("B computed where no gradient is wanted")


@pytest.mark.parametrize("name", quantizers.names())
def test_without_autograd_only_f_is_computed(name):
    """Under no_grad, or when nothing requires a gradient, the fused path computes F alone: a B that raises
    is never called, and the values are the reference's."""
    q = quantizers.get(name).set_progress(0.37)
    x, shift, _, _ = case_inputs("threshold_conv")
    with kernels.using("reference"):
        want = q.apply_pair(x, shift=shift).detach()
    params = q.params
    with kernels.using("eager"):
        with torch.no_grad():
            got = fused.apply(x.detach().requires_grad_(), q.forward_fn, _no_backward, params, shift=shift)
        assert got.grad_fn is None and torch.equal(got, want)
        got = fused.apply(x.detach(), q.forward_fn, _no_backward, params, shift=shift.detach())
        assert got.grad_fn is None and torch.equal(got, want)  # nothing requires a gradient
        with pytest.raises(AssertionError, match="B computed"):  # with autograd, B is computed beside F
            fused.apply(x.detach().requires_grad_(), q.forward_fn, _no_backward, params, shift=shift)


@pytest.mark.parametrize("name", quantizers.names())
def test_reference_and_fused_paths_are_selectable(name):
    q = quantizers.get(name).set_progress(0.5)
    x = latent((4, 3)).requires_grad_()
    with kernels.using("reference"):
        assert q(x).grad_fn.name() == "_PairBackward"
    with kernels.using("auto"):
        assert q(x).grad_fn.name() == "FusedPairBackward"


def test_react_learnable_beta_gets_the_fused_gradient():
    torch.manual_seed(0)
    results = {}
    for mode in ("reference", "eager"):
        q = quantizers.get("react", learnable_beta=True, channels=4, beta=0.2)
        x = latent((3, 4, 5, 5)).requires_grad_()
        with kernels.using(mode):
            y = q(x)
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results[mode] = (y.detach(), x.grad, q.beta.grad)
    for r, g in zip(results["reference"], results["eager"], strict=True):
        close(g, r, "react learnable beta")


def layer_step(mode, make, progress, x):
    """Output, input gradient and every parameter gradient of one binarized layer's forward + backward."""
    torch.manual_seed(0)
    layer = make().to(x.dtype)
    if layer.accumulator_bits:  # half the output channels all positive: their accumulators reach the wrap
        with torch.no_grad():
            layer.weight[: layer.weight.shape[0] // 2].abs_()
    set_progress(layer, progress)
    x = x.detach().clone().requires_grad_()
    with kernels.using(mode):
        y = layer(x)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, int(layer.overflow_count)


LAYERS = {
    "conv_bwaa_layer": (lambda: BinaryConv2d(16, 8, 3, padding=1, bias=True, act_quantizer="bnn++", accumulator_bits=8),
                        (2, 16, 6, 6)),
    "conv_bwaa_channel": (lambda: BinaryConv2d(16, 8, 3, padding=1, bias=False, act_quantizer="bnn",
                                               accumulator_bits=8, scaling="channel"), (2, 16, 6, 6)),
    "linear_bwaa": (lambda: BinaryLinear(300, 7, act_quantizer="bnn++", accumulator_bits=8), (3, 5, 300)),
    "conv_bwa_raw": (lambda: BinaryConv2d(4, 6, 3, act_quantizer="ede+", units="raw"), (2, 4, 7, 7)),
    "linear_bw": (lambda: BinaryLinear(9, 5, weight_quantizer="pc"), (4, 9)),
}


def compare_layer(case, mode, progress):
    make, shape = LAYERS[case]
    x = latent(shape, seed=3) + 2.5  # mostly positive, so that BWAA accumulators overflow
    ref = layer_step("reference", make, progress, x)
    got = layer_step(mode, make, progress, x)
    exact = layer_step("reference", make, progress, x.double()) if mode != "eager" else (None, None, {})
    what = f"{case} progress {progress}"
    close(got[0], ref[0], f"{what} output", exact[0])
    close(got[1], ref[1], f"{what} grad x", exact[1])
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        close(got[2][n], ref[2][n], f"{what} grad {n}", exact[2].get(n))
    assert got[3] == ref[3], f"{what} overflow count"
    return ref


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_eager_fused_layers_equal_reference(case):
    for p in PROGRESS:
        ref = compare_layer(case, "eager", p)
    if "bwaa" in case:
        assert ref[3] > 0, "the inputs should make some accumulators wrap"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_wrap_by_floor_is_wrap_integer_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([
        torch.arange(-70000, 70000, 7, dtype=torch.float64),  # integers, far past the 8-bit range
        torch.randn(20000, generator=gen, dtype=torch.float64) * 300,  # soft accumulators (training forward)
        torch.tensor([0.0, -0.0, 127.0, 127.5, 128.0, -128.0, -128.5, -129.0, 255.99, 2.0**25 + 2, -(2.0**40)]),
    ]).to(dtype)
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    for bits in (8, 4, 16):  # compared as raw bits: -0.0 and +0.0 differ there
        assert torch.equal(wrap_by_floor(z, bits).view(as_int), wrap_integer(z, bits).view(as_int)), bits


def test_unknown_mode_names_the_value_as_typed_where_it_came_from_and_the_valid_ones():
    before = kernels.mode()
    with pytest.raises(ValueError) as err:
        kernels.set_mode(" Fast ")
    assert str(err.value) == ("unknown fused-kernel mode ' Fast ' (pcpp.kernels.set_mode); valid: auto, compile, "
                              "eager, reference (or 1 = auto, 0 = reference)")
    assert kernels.mode() == before
    # the environment, read at import: a fresh interpreter refuses it naming PCPP_FUSED
    done = run_python("import pcpp.kernels", {kernels.ENV: "Fused"})
    assert done.returncode != 0
    assert ("ValueError: unknown fused-kernel mode 'Fused' (PCPP_FUSED); valid: auto, compile, eager, reference "
            "(or 1 = auto, 0 = reference)") in done.stderr


def run_python(code: str, env: dict[str, str | None]) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (pcpp.kernels reads PCPP_FUSED once, at import), with `env` applied to
    this one's environment (None removes a variable)."""
    full = dict(os.environ)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-c", code], env=full, cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=300)


def test_fused_is_the_default_without_pcpp_fused():
    done = run_python("from pcpp import kernels; print(kernels.mode())", {kernels.ENV: None})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "auto"
    for value, mode in (("0", "reference"), ("1", "auto"), ("", "auto"), (" Eager ", "eager")):
        assert kernels._check(value) == mode


def test_mode_aliases_and_restore():
    before = kernels.mode()
    with kernels.using("0"):
        assert kernels.mode() == "reference" and not kernels.fused()
        with kernels.using("1"):
            assert kernels.mode() == "auto" and kernels.fused()
    assert kernels.mode() == before


def test_a_failing_compiler_falls_back_once_with_a_warning(monkeypatch):
    calls = []

    def broken(fn):
        def compiled(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("no C++ compiler found")
        return compiled

    monkeypatch.setattr(kernels, "_compiled_kernel", lambda fn, name: broken(fn))
    monkeypatch.setattr(kernels, "_broken", {})
    q = quantizers.get("bnn++").set_progress(0.5)
    x = latent((3, 4, 5, 5))
    with kernels.using("compile"):
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*run eagerly"):
            y = q(x)
        y2 = q(x)  # no second attempt, no second warning
    assert len(calls) == 1 and "cpu" in kernels.compile_failures()
    with kernels.using("reference"):
        close(y, q(x), "fallback output")
    close(y2, y, "second call")


def test_bad_inputs_raise_and_do_not_disable_compiling(monkeypatch):
    monkeypatch.setattr(kernels, "_compiled_kernel", lambda fn, name: fn)
    monkeypatch.setattr(kernels, "_broken", {})
    q = quantizers.get("bnn++")
    with kernels.using("compile"), pytest.raises(RuntimeError):
        q.apply_pair(torch.zeros(3, 4), shift=torch.zeros(5))
    assert kernels.compile_failures() == {}


def test_tanh_by_exp_is_within_two_ulp_of_tanh_and_eager_tanh_is_torch_tanh():
    from pcpp.quantizers import functions as fn

    x64 = torch.cat([torch.linspace(-12.0, 12.0, 200_001, dtype=torch.float64),
                     torch.logspace(-30, 1, 2_001, dtype=torch.float64)])
    x64 = torch.cat([x64, -x64, torch.tensor([0.2, -0.2, 0.19999999, 0.20000001], dtype=torch.float64)])
    x = x64.float()
    exact = torch.tanh(x.double())  # tanh of the float32 inputs, in float64
    rel = ((fn.tanh_by_exp(x).double() - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()
    assert rel < 2.5e-7  # 2 ulp of float32 (torch.tanh's own: 6e-8)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40])
    out = fn.tanh_by_exp(special)
    assert out[:4].tolist() == [0.0, 0.0, 1.0, -1.0] and torch.signbit(out[1]) and torch.isnan(out[4])
    assert out[5].item() == pytest.approx(1e-40, rel=1e-6)
    # outside a compile trace (the reference and eager paths): torch.tanh itself, in every dtype
    assert torch.equal(fn.tanh(x), torch.tanh(x)) and torch.equal(fn.tanh(x64), torch.tanh(x64))
