"""BWAA's accumulators (WrapNet, Ni et al. 2020; the paper's section 4, BWAA).

The dot products of +-1 operands are integers; they wrap to `bits`-bit two's complement (cyclic
overflow) in the forward, and the gradient passes straight through the wrap.

A BWAA layer's output is wrap(acc) * s (+ bias), s the weight scale, and it counts the accumulators that
overflowed. `wrap_scale` does that in one pass over acc (pcpp.kernels: compiled where possible; the wrap
through floor, bit for bit the same) and one in the backward (grad * s, the bias gradient reduced in the
same kernel); the reference path (pcpp.kernels mode "reference") composes the same steps from separate
autograd ops. Compiled, on a 128x16x32x32 accumulator (one thread): 1.5 ms forward (4.1 ms with remainder),
0.8 ms backward, against 0.5 ms for a ReLU.
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


def wrap_by_floor(z: torch.Tensor, bits: int) -> torch.Tensor:
    """wrap_integer(z, bits) bit for bit, through floor instead of remainder (2.4x faster compiled: remainder's
    vectorized fmod is slow). Exact because the modulus 2^bits is a power of two: v / 2^bits, floor and
    2^bits * floor are exact, and so is v - 2^bits * floor(v / 2^bits) in [0, 2^bits), as fmod is."""
    half = 2 ** (bits - 1)
    v = z + half
    return v - torch.floor(v * (0.5 / half)) * (2 * half) - half


def _wrap_scale_forward(acc, scale, bias, bits, dtype, count_dtype):
    out = (wrap_by_floor(acc, bits) * scale).to(dtype)
    if bias is not None:
        out = out + bias
    half = 2 ** (bits - 1)
    return out, ((acc < -half) | (acc > half - 1)).sum(dtype=count_dtype)


def _wrap_scale_backward(grad, scale, bias_shape, dtype):
    gacc = grad.to(dtype) * scale
    return gacc, None if bias_shape is None else grad.sum_to_size(bias_shape)


class WrapScale(torch.autograd.Function):
    """(wrap(acc) * scale).to(out dtype) + bias, and the overflow count; the gradient passes through the wrap
    (grad * scale to acc, summed to the bias); scale is a detached constant."""

    @staticmethod
    def forward(acc, scale, bias, bits, dtype):
        # An int32 count is cheaper to reduce than int64 and cannot overflow below 2^31 entries.
        count_dtype = torch.int32 if acc.numel() < 2**31 else torch.int64
        # Detached: compiled kernels specialize on requires_grad and on nn.Parameter (the bias) shapes.
        out, count = kernels.run(_wrap_scale_forward, "pcpp_wrap_scale_fwd", acc, acc.detach(), scale,
                                 None if bias is None else bias.detach(), bits, dtype, count_dtype)
        return out, count.to(torch.int64)

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
