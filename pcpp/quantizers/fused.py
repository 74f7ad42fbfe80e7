"""A quantizer pair applied in one pass per tensor: the fused form of eq. (7) with its shift and scales.

A binarized layer applies a pair as out_scale * F((x - shift) / scale): shift is an activation threshold
beta, scale and out_scale the weight scale s (scaled units: both s; raw units: out_scale s only). Composed
from separate autograd ops, that is one pass and one full-size temporary per op, forward and backward, and
the shifted input x - beta is kept for the backward. `FusedPair` computes the output in one kernel, keeps
only its inputs (x is kept by the layer before anyway; weights are parameters), and recomputes x - beta in
the backward kernel, which also reduces the threshold's gradient:

    grad_x = (grad * out_scale) * B((x - shift) / scale) / scale,   grad_shift = -sum(grad_x) to shift's shape

in the same order of operations as the composed autograd ops (pcpp.kernels.mode() == "reference"), so the
eager kernels give the reference's values and the compiled ones agree to rounding (tests/unit/test_fused.py).
scale and out_scale are detached constants (as in the layers); shift gets a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcpp import kernels

_forward_kernels: dict[Callable, Callable] = {}
_backward_kernels: dict[Callable, Callable] = {}


def forward_kernel(forward_fn: Callable) -> Callable:
    """out_scale * F((x - shift) / scale) for a pair's F; None skips a step."""
    kernel = _forward_kernels.get(forward_fn)
    if kernel is None:
        def kernel(x, shift, scale, out_scale, params):
            u = x if shift is None else x - shift
            if scale is not None:
                u = u / scale
            y = forward_fn(u, **params)
            return y if out_scale is None else out_scale * y

        _forward_kernels[forward_fn] = kernel
    return kernel


def backward_kernel(backward_fn: Callable) -> Callable:
    """(grad_x, grad_shift or None) for a pair's B; see the module docstring."""
    kernel = _backward_kernels.get(backward_fn)
    if kernel is None:
        def kernel(grad, x, shift, scale, out_scale, params, shift_grad):
            u = x if shift is None else x - shift
            if scale is not None:
                u = u / scale
            g = grad if out_scale is None else grad * out_scale
            g = g * backward_fn(u, **params)
            if scale is not None:
                g = g / scale
            return g, (-g).sum_to_size(shift.shape) if shift_grad else None

        _backward_kernels[backward_fn] = kernel
    return kernel


def _name(fn: Callable, direction: str) -> str:
    owner = getattr(fn, "__qualname__", "pair").split(".")[0]
    return f"pcpp_{owner}_{fn.__name__}_{direction}".replace("<", "").replace(">", "")


class FusedPair(torch.autograd.Function):
    """out_scale * F((x - shift) / scale), gradients as in the module docstring. Parameters frozen at forward."""

    @staticmethod
    def forward(x, shift, scale, out_scale, forward_fn, backward_fn, params):
        y = kernels.run(forward_kernel(forward_fn), _name(forward_fn, "fwd"), x, x, shift, scale, out_scale, params)
        return y.view_as(y) if y is x else y  # autograd refuses an input returned as-is

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, out_scale, _, backward_fn, params = inputs
        ctx.save_for_backward(x, shift, scale, out_scale)
        ctx.backward_fn = backward_fn
        ctx.params = params

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale, out_scale = ctx.saved_tensors
        shift_grad = shift is not None and ctx.needs_input_grad[1]
        gx, gshift = kernels.run(backward_kernel(ctx.backward_fn), _name(ctx.backward_fn, "bwd"), grad, grad, x,
                                 shift, scale, out_scale, ctx.params, shift_grad)
        return gx, gshift, None, None, None, None, None


def apply(x: torch.Tensor, forward_fn: Callable, backward_fn: Callable, params: dict, shift=None, scale=None,
          out_scale=None) -> torch.Tensor:
    """The fused pair (FusedPair). scale and out_scale are used detached."""
    scale = None if scale is None else torch.as_tensor(scale).detach()
    out_scale = None if out_scale is None else torch.as_tensor(out_scale).detach()
    return FusedPair.apply(x, shift, scale, out_scale, forward_fn, backward_fn, params)
