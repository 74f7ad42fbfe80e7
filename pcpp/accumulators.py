"""BWAA's accumulators (WrapNet, Ni et al. 2020; the paper's section 4, BWAA).

The dot products of +-1 operands are integers; they wrap to `bits`-bit two's complement (cyclic
overflow) in the forward, and the gradient passes straight through the wrap.

A BWAA layer's output is wrap(acc) * s (+ bias), s the weight scale, and it counts the accumulators that
overflowed. `wrap_scale` does that in one pass over acc (pcpp.kernels: compiled where possible) and one in
the backward (grad * s, the bias gradient reduced in the same kernel); the reference path (pcpp.kernels
mode "reference") composes the same steps from separate autograd ops.
"""

from __future__ import annotations

import torch

from pcpp import kernels


def wrap_integer(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement wrap of (integer-valued) z into [-2^(bits-1), 2^(bits-1) - 1]."""
    half = 2 ** (bits - 1)
    return torch.remainder(z + half, 2 * half) - half


def overflow_count(z: torch.Tensor, bits: int) -> torch.Tensor:
    """How many entries of z lie outside [-2^(bits-1), 2^(bits-1) - 1] (an int64 scalar tensor)."""
    half = 2 ** (bits - 1)
    return ((z < -half) | (z > half - 1)).sum()


class WrapSTE(torch.autograd.Function):
    """Cyclic overflow in the forward, identity in the backward (WrapNet)."""

    @staticmethod
    def forward(z, bits):
        return wrap_integer(z, bits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _wrap_scale_forward(acc, scale, bias, bits, dtype):
    out = (wrap_integer(acc, bits) * scale).to(dtype)
    if bias is not None:
        out = out + bias
    return out, overflow_count(acc, bits)


def _wrap_scale_backward(grad, scale, bias_shape, dtype):
    gacc = grad.to(dtype) * scale
    return gacc, None if bias_shape is None else grad.sum_to_size(bias_shape)


class WrapScale(torch.autograd.Function):
    """(wrap(acc) * scale).to(out dtype) + bias, and the overflow count; the gradient passes through the wrap
    (grad * scale to acc, summed to the bias); scale is a detached constant."""

    @staticmethod
    def forward(acc, scale, bias, bits, dtype):
        return kernels.run(_wrap_scale_forward, "pcpp_wrap_scale_fwd", acc, acc, scale, bias, bits, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        acc, scale, bias, _, _ = inputs
        ctx.save_for_backward(scale)
        ctx.acc_dtype = acc.dtype
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        (scale,) = ctx.saved_tensors
        bias_shape = ctx.bias_shape if ctx.needs_input_grad[2] else None
        gacc, gbias = kernels.run(_wrap_scale_backward, "pcpp_wrap_scale_bwd", grad, grad, scale, bias_shape,
                                  ctx.acc_dtype)
        return gacc, None, gbias, None, None


def wrap_scale(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(BWAA output, overflow count): (wrap(acc) * scale).to(dtype) + bias and the number of entries of acc
    outside the `bits`-bit range; the gradient reaches acc as grad * scale (straight through the wrap) and
    bias as the sum of grad. scale (broadcast against acc) is used detached; dtype defaults to acc's."""
    dtype = acc.dtype if dtype is None else dtype
    scale = scale.detach()
    if kernels.fused():
        return WrapScale.apply(acc, scale, bias, bits, dtype)
    with torch.no_grad():
        count = overflow_count(acc, bits)
    out = (WrapSTE.apply(acc, bits) * scale).to(dtype)
    if bias is not None:
        out = out + bias
    return out, count
