"""The forward/backward proximal quantizer pair (paper eq. (6)-(7)) and its registry.

A pair is two pure tensor functions, F (forward) and B (backward factor). Applied to a latent tensor
w*, the output is F(w*) and the gradient reaching w* is grad * B(w*). Scheduled parameters (mu, rho,
t, k, ...) are pure functions of the training progress p in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from pcpp import kernels
from pcpp.quantizers import fused
from pcpp.quantizers.functions import sign
from pcpp.registry import Registry
from pcpp.registry import unknown as _unknown
from pcpp.schedules import Schedule, as_schedule, check_progress

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: register a pair once, by its `name` (ValueError if the name is taken)."""
    return QUANTIZERS.register(cls)


def names() -> list[str]:
    """The registered pair names, in registration order (the paper's Table 1, then Appendix F)."""
    return QUANTIZERS.names()


def quantizer_class(name: str) -> type[Quantizer]:
    """The pair class registered as `name`; ValueError listing the valid names otherwise."""
    return QUANTIZERS.cls(name)


def get(name: str, **params) -> Quantizer:
    """Build the registered pair `name`; keywords fix parameters (mu=5.0) or pass schedules/options."""
    return quantizer_class(name)(**params)


class _Pair(torch.autograd.Function):
    """Output F(w), gradient grad * B(w): eq. (7). Parameters are frozen at forward time."""

    @staticmethod
    def forward(w, forward_fn, backward_fn, params):
        out = forward_fn(w, **params)
        return out.view_as(out) if out is w else out  # autograd refuses an input returned as-is

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, _, backward_fn, params = inputs
        ctx.save_for_backward(w)
        ctx.backward_fn = backward_fn
        ctx.params = params

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * ctx.backward_fn(w, **ctx.params), None, None, None


def _constant(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


class Quantizer(nn.Module):
    """An elementwise (F, B) pair with scheduled parameters.

    Subclasses set `name`, the formula strings, `source`, `schedules` (defaults), optionally
    `derived` (parameters computed from the others unless fixed by the user), and implement the two
    static pure functions `forward_fn(w, **params)` and `backward_fn(w, **params)`.
    """

    name: ClassVar[str] = ""
    forward_formula: ClassVar[str] = ""
    backward_formula: ClassVar[str] = ""
    source: ClassVar[str] = ""
    schedules: ClassVar[dict[str, Schedule]] = {}
    derived: ClassVar[dict[str, Callable[[dict], float]]] = {}
    options: ClassVar[dict[str, object]] = {}

    def __init__(self, **params):
        super().__init__()
        valid = self.parameter_names() + list(self.options)
        for key in params:
            if key not in valid:
                raise _unknown(f"parameter of quantizer {self.name!r}", key, valid)
        self.param_schedules: dict[str, Schedule] = {
            k: as_schedule(params.get(k, default)) for k, default in self.schedules.items()
        }
        for k in self.derived:
            if k in params:
                self.param_schedules[k] = as_schedule(params[k])
        self.opts = {k: params.get(k, v) for k, v in self.options.items()}
        self.progress = 0.0

    @classmethod
    def parameter_names(cls) -> list[str]:
        return list(cls.schedules) + [k for k in cls.derived if k not in cls.schedules]

    def set_progress(self, progress: float) -> Quantizer:
        """Move every scheduled parameter to training progress p = step / total_steps in [0, 1]."""
        self.progress = check_progress(progress)
        return self

    @property
    def params(self) -> dict[str, float]:
        """Current parameter values (schedules evaluated at the current progress)."""
        values = {k: s(self.progress) for k, s in self.param_schedules.items()}
        for k, fn in self.derived.items():
            if k not in values:
                values[k] = float(fn(values))
        return values

    @staticmethod
    def forward_fn(w: torch.Tensor, **params) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def backward_fn(w: torch.Tensor, **params) -> torch.Tensor:
        raise NotImplementedError

    def F(self, w: torch.Tensor) -> torch.Tensor:
        """Forward quantizer at the current parameters (no autograd)."""
        return self.forward_fn(w, **self.params)

    def B(self, w: torch.Tensor) -> torch.Tensor:
        """Backward factor at the current parameters (no autograd)."""
        return self.backward_fn(w, **self.params)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.apply_pair(w)

    def apply_pair(self, x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   out_scale: torch.Tensor | None = None, params: dict | None = None) -> torch.Tensor:
        """out_scale * F((x - shift) / scale) with autograd: gradient grad * out_scale * B(.) / scale to x and
        its negative, summed to shift's shape, to shift (an activation threshold). scale and out_scale (the
        weight scale s) are detached constants; None skips a step; params default to the current ones.

        One fused pass per tensor (pcpp.quantizers.fused) unless pcpp.kernels selects the reference path,
        which composes the same steps from separate autograd ops.
        """
        params = self.params if params is None else params
        if kernels.fused():
            return fused.apply(x, self.forward_fn, self.backward_fn, params, shift, scale, out_scale)
        u = x if shift is None else x - shift
        if scale is not None:
            u = u / _constant(scale)
        y = _Pair.apply(u, self.forward_fn, self.backward_fn, params)
        return y if out_scale is None else _constant(out_scale) * y

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        """The honest binary value the pair converges to: sign(w) (identity for fp, shifted for ReAct)."""
        return sign(w)

    @property
    def is_binary(self) -> bool:
        """True when F takes values in {-1, +1} only at the current parameters."""
        probe = torch.linspace(-3, 3, 601, dtype=torch.float64)
        return bool(torch.all(self.F(probe).abs() == 1.0))

    def describe(self) -> str:
        sched = ", ".join(f"{k}: {s}" for k, s in self.param_schedules.items())
        derived = ", ".join(f"{k} derived" for k in self.derived if k not in self.param_schedules)
        return "; ".join(x for x in (sched, derived) if x) or "-"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, {self.describe()}"

    def state(self) -> dict:
        """Serialisable description (name, schedules, options) that `from_state` rebuilds."""
        return {
            "name": self.name,
            "params": {k: s.to_dict() for k, s in self.param_schedules.items()},
            "options": dict(self.opts),
        }


def from_state(state: dict) -> Quantizer:
    return get(state["name"], **state.get("params", {}), **state.get("options", {}))
