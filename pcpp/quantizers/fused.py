"""A quantizer pair applied in one pass per tensor: the fused form of eq. (7) with its shift and scales.

A binarized layer applies a pair as out_scale * F((x - shift) / scale): shift is an activation threshold
beta, scale and out_scale the weight scale s (scaled units: both s; raw units: out_scale s only). Composed
from separate autograd ops, that is one pass and one full-size temporary per op, forward and backward.
`FusedPair` computes, in one forward kernel, the output and B at the same point (the two share their
transcendental: tanh for bnn++, ede, ede+), keeps B (the multiplier of the gradient; the composed ops kept
x - beta instead, of the same size), and the backward is one pass that also reduces the threshold's gradient:

    grad_x = (grad * out_scale) * B((x - shift) / scale) / scale,   grad_shift = -sum(grad_x) to shift's shape

in the composed autograd ops' order of operations (pcpp.kernels.mode() == "reference"), so the eager kernels
give the reference's values and the compiled ones agree to rounding (tests/unit/test_fused.py). Measured on a
ResNet-20 activation (128x16x32x32, one thread, compiled): F alone 3.9 ms, F and B 4.2 ms, the backward from
the kept B 1.4 ms, from x (recomputing B) 4.1 ms. Without autograd (no_grad, or nothing requires a gradient)
only F is computed. scale and out_scale are detached constants (as in the layers); shift gets a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcpp import kernels

_forward_kernels: dict[tuple[Callable, Callable | None], Callable] = {}


def forward_kernel(forward_fn: Callable, backward_fn: Callable | None = None) -> Callable:
    """out_scale * F((x - shift) / scale), and B((x - shift) / scale) too when backward_fn is given (a pair
    (y, B)); None skips a step."""
    kernel = _forward_kernels.get((forward_fn, backward_fn))
    if kernel is None:
        def kernel(x, shift, scale, out_scale, params):
            u = x if shift is None else x - shift
            if scale is not None:
                u = u / scale
            y = forward_fn(u, **params)
            y = y if out_scale is None else out_scale * y
            return y if backward_fn is None else (y, backward_fn(u, **params))

        _forward_kernels[(forward_fn, backward_fn)] = kernel
    return kernel


def backward_kernel(grad, b, scale, out_scale, shift_shape):
    """(grad_x, grad_shift or None) from the kept B; see the module docstring. The same for every pair."""
    g = grad if out_scale is None else grad * out_scale
    g = g * b
    if scale is not None:
        g = g / scale
    return g, None if shift_shape is None else (-g).sum_to_size(shift_shape)


def _plain(*tensors):
    """The tensors detached: a compiled kernel then sees plain tensors, whatever the caller holds (torch.compile
    specializes on nn.Parameter shapes and on requires_grad, so weights and thresholds would recompile per
    layer shape and per grad mode)."""
    return tuple(None if t is None else t.detach() for t in tensors)


def _name(fn: Callable, direction: str, weight: bool) -> str:
    """pcpp_<Pair>_<fwd|bwd>_<weight|act>: compiled per role, see pcpp.kernels.run."""
    owner = getattr(fn, "__qualname__", "pair").split(".")[0].replace("<", "").replace(">", "")
    return f"pcpp_{owner}_{direction}_{'weight' if weight else 'act'}"


class FusedPair(torch.autograd.Function):
    """out_scale * F((x - shift) / scale), gradients as in the module docstring. Parameters frozen at forward."""

    @staticmethod
    def forward(ctx, x, shift, scale, out_scale, forward_fn, backward_fn, params):
        weight = scale is not None or out_scale is not None
        xd, shiftd = _plain(x, shift)
        y, b = kernels.run(forward_kernel(forward_fn, backward_fn), _name(forward_fn, "fwd", weight), x, xd,
                           shiftd, scale, out_scale, params)
        ctx.save_for_backward(b, scale, out_scale)
        ctx.shift_shape = None if shift is None else shift.shape
        ctx.weight = weight
        return x.view_as(x) if y is xd else y  # F = identity (fp): a view, autograd refuses an input as output

    @staticmethod
    def backward(ctx, grad):
        b, scale, out_scale = ctx.saved_tensors
        shift_shape = ctx.shift_shape if ctx.needs_input_grad[1] else None
        name = f"pcpp_pair_bwd_{'weight' if ctx.weight else 'act'}"
        gx, gshift = kernels.run(backward_kernel, name, grad, grad, b, scale, out_scale, shift_shape)
        return gx, gshift, None, None, None, None, None


def apply(x: torch.Tensor, forward_fn: Callable, backward_fn: Callable, params: dict, shift=None, scale=None,
          out_scale=None) -> torch.Tensor:
    """The fused pair (FusedPair); only F when no gradient is wanted. scale and out_scale are used detached."""
    scale = None if scale is None else torch.as_tensor(scale).detach()
    out_scale = None if out_scale is None else torch.as_tensor(out_scale).detach()
    if torch.is_grad_enabled() and (x.requires_grad or (shift is not None and shift.requires_grad)):
        return FusedPair.apply(x, shift, scale, out_scale, forward_fn, backward_fn, params)
    weight = scale is not None or out_scale is not None
    xd, shiftd = _plain(x, shift)
    y = kernels.run(forward_kernel(forward_fn), _name(forward_fn, "fwd_nograd", weight), x, xd, shiftd, scale,
                    out_scale, params)
    return x.view_as(x) if y is xd else y
