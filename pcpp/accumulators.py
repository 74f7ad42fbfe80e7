"""BWAA's accumulators (WrapNet, Ni et al. 2020; the paper's section 4, BWAA).

The dot products of +-1 operands are integers; they wrap to `bits`-bit two's complement (cyclic
overflow) in the forward, and the gradient passes straight through the wrap.
"""

from __future__ import annotations

import torch


def wrap_integer(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement wrap of (integer-valued) z into [-2^(bits-1), 2^(bits-1) - 1]."""
    half = 2 ** (bits - 1)
    return torch.remainder(z + half, 2 * half) - half


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
