"""Update rules beyond the pair (paper section 2), as optimizer-level pieces for any torch optimizer.

- `pc++`  (default): latent w*, forward F(w*), gradient through B; the optimizer steps w*. No hook.
- `pq`    (ProxQuant, Bai et al.): forward uses w directly; after each step w <- L_rho(w).
- `rpc`   (reverse ProxConnect): gradient taken at w*; the step starts from L_rho(w*).
- `ptb`   (post-training binarization): plain full-precision training, w <- sign(w) once at the end.

The rules act on the latent tensors of binarized layers in units of their scale s (w <- s L(w / s)),
matching the pairs' scale convention; pass `scale_of(p)` to supply s (default 1).
The forward pair a layer should use while a rule trains is `rule.training_quantizer` (None keeps the
layer's own pair; "fp" means the forward sees w directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch

from pcpp.quantizers import functions as fn
from pcpp.quantizers.base import _unknown
from pcpp.schedules import Schedule, as_schedule, check_progress, constant, linear

ScaleFn = Callable[[torch.Tensor], torch.Tensor | float]

_RULES: dict[str, type[UpdateRule]] = {}


def _register(cls):
    _RULES[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    return list(_RULES)


def get_rule(name: str, **params) -> UpdateRule:
    try:
        cls = _RULES[name]
    except KeyError:
        raise _unknown("update rule", name, rule_names()) from None
    return cls(**params)


def _apply_scaled(p: torch.Tensor, scale_of: ScaleFn | None, f: Callable[[torch.Tensor], torch.Tensor]):
    with torch.no_grad():
        s = 1.0 if scale_of is None else scale_of(p)
        p.copy_(s * f(p / s))


class UpdateRule:
    """Hooks around `optimizer.step()`; `progress` is step / total steps in [0, 1]."""

    name: ClassVar[str] = ""
    training_quantizer: ClassVar[str | None] = None
    schedules: ClassVar[dict[str, Schedule]] = {}

    def __init__(self, **params):
        for key in params:
            if key not in self.schedules:
                raise _unknown(f"parameter of update rule {self.name!r}", key, list(self.schedules))
        self.param_schedules = {k: as_schedule(params.get(k, d)) for k, d in self.schedules.items()}

    def values(self, progress: float) -> dict[str, float]:
        p = check_progress(progress)
        return {k: s(p) for k, s in self.param_schedules.items()}

    def before_step(self, params: Iterable[torch.Tensor], progress: float, scale_of: ScaleFn | None = None):
        pass

    def after_step(self, params: Iterable[torch.Tensor], progress: float, scale_of: ScaleFn | None = None):
        pass

    def finalize(self, params: Iterable[torch.Tensor], scale_of: ScaleFn | None = None):
        """Called once after training (PTB binarizes here)."""


@_register
class PCPlusPlus(UpdateRule):
    """PC++ (eq. 7): the pair does all the work; the optimizer steps the latent weights."""

    name = "pc++"


@_register
class ProxQuant(UpdateRule):
    """ProxQuant: w_{t+1} = L_rho(w_t - eta grad l(w_t)); rho 0.01 -> 10 linear (section 4.1)."""

    name = "pq"
    training_quantizer = "fp"
    schedules = {"rho": linear(0.01, 10.0), "varrho": constant(0.0)}

    def after_step(self, params, progress, scale_of=None):
        v = self.values(progress)
        for p in params:
            _apply_scaled(p, scale_of, lambda x: fn.prox_linear(x, v["rho"], v["varrho"]))


@_register
class ReversePC(UpdateRule):
    """Reverse PC: w*_{t+1} = L_rho(w*_t) - eta grad l(w*_t); the gradient is computed before the map."""

    name = "rpc"
    training_quantizer = "fp"
    schedules = {"rho": linear(0.01, 10.0), "varrho": constant(0.0)}

    def before_step(self, params, progress, scale_of=None):
        v = self.values(progress)
        for p in params:
            _apply_scaled(p, scale_of, lambda x: fn.prox_linear(x, v["rho"], v["varrho"]))

    def finalize(self, params, scale_of=None):
        """The point rPC evaluates is L_rho(w*) at the final rho (sign for rho >= 1), not the last step."""
        self.before_step(params, 1.0, scale_of)


@_register
class PostTraining(UpdateRule):
    """PTB: train in full precision, binarize once at the end (w <- s sign(w / s))."""

    name = "ptb"
    training_quantizer = "fp"

    def finalize(self, params, scale_of=None):
        for p in params:
            _apply_scaled(p, scale_of, fn.sign)


class RuleOptimizer:
    """Wrap any torch optimizer with an update rule acting on `params` (the binarized latents).

    `step(progress)` runs before_step, the optimizer's step, after_step; everything else is delegated
    to the wrapped optimizer (zero_grad, state_dict, param_groups...).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rule: UpdateRule, params: Iterable[torch.Tensor],
                 scale_of: ScaleFn | None = None):
        self.optimizer = optimizer
        self.rule = rule
        self.params = list(params)
        self.scale_of = scale_of

    def step(self, progress: float):
        self.rule.before_step(self.params, progress, self.scale_of)
        self.optimizer.step()
        self.rule.after_step(self.params, progress, self.scale_of)

    def finalize(self):
        self.rule.finalize(self.params, self.scale_of)

    def __getattr__(self, item):
        return getattr(self.optimizer, item)
