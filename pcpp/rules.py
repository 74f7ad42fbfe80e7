"""Update rules beyond the pair (paper section 2): hooks around the optimizer step, for any optimizer.

- `pc++`  (default): latent w*, forward F(w*), gradient through B; the optimizer steps w*. No hook.
- `pq`    (ProxQuant, Bai et al.): forward uses w directly; after each step w <- L_rho(w).
- `rpc`   (reverse ProxConnect): gradient taken at w*; the step starts from L_rho(w*).
- `ptb`   (post-training binarization): plain full-precision training, w <- sign(w) once at the end.

A rule is a registered class (pcpp.registry, the quantizer pairs' helper) with three hooks, no-ops by
default: `before_step` and `after_step` around every optimizer step, `finalize` once after training.
Training calls them only through this interface (RuleOptimizer), never by a rule's name, so a new rule
needs nothing but its class.

The rules act on the latent tensors of binarized layers in units of their scale s (w <- s L(w / s)),
matching the pairs' scale convention; `scale_of(p)` supplies s (default 1). The forward pair a layer
uses while a rule trains is `rule.training_quantizer` (None keeps the layer's own pair; "fp" means the
forward sees w directly: pcpp.layers.set_latent_forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch

from pcpp.prox import prox_linear
from pcpp.quantizers.functions import sign
from pcpp.registry import Registry
from pcpp.registry import unknown as _unknown
from pcpp.schedules import Schedule, as_schedule, check_progress, constant, linear

ScaleFn = Callable[[torch.Tensor], torch.Tensor | float]
HOOKS = ("before_step", "after_step", "finalize")

RULES: Registry[type[UpdateRule]] = Registry("update rule")


def register(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Class decorator: register an update rule once, by its `name` (ValueError if the name is taken)."""
    return RULES.register(cls)


def rule_names() -> list[str]:
    """The registered rule names, in registration order (pc++, pq, rpc, ptb)."""
    return RULES.names()


def get_rule(name: str, **params) -> UpdateRule:
    """Build the registered rule `name`; keywords fix or schedule its parameters (rho=0.5, rho={...}).

    Raises ValueError for an unknown name or parameter, listing the valid ones.
    """
    return RULES.build(name, **params)


def apply_scaled(p: torch.Tensor, scale_of: ScaleFn | None, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """p <- s f(p / s) in place, without autograd; s = scale_of(p) (1 when scale_of is None)."""
    with torch.no_grad():
        s = 1.0 if scale_of is None else scale_of(p)
        p.copy_(s * f(p / s))


class UpdateRule:
    """Hooks around `optimizer.step()`; `progress` is step / total steps in [0, 1] (pcpp.schedules).

    Subclasses set `name`, optionally `training_quantizer` and `schedules` (their parameters' defaults),
    and override any of the hooks. `params` are the latent weights the rule acts on, edited in place.
    """

    name: ClassVar[str] = ""
    training_quantizer: ClassVar[str | None] = None
    schedules: ClassVar[dict[str, Schedule]] = {}

    def __init__(self, **params):
        for key in params:
            if key not in self.schedules:
                raise _unknown(f"parameter of update rule {self.name!r}", key, list(self.schedules))
        self.param_schedules = {k: as_schedule(params.get(k, d)) for k, d in self.schedules.items()}

    def values(self, progress: float) -> dict[str, float]:
        """The parameters at `progress` in [0, 1] (ValueError outside)."""
        p = check_progress(progress)
        return {k: s(p) for k, s in self.param_schedules.items()}

    @classmethod
    def acts(cls, hook: str) -> bool:
        """Whether this rule overrides `hook` (one of HOOKS): a no-op hook needs no master-copy sync."""
        if hook not in HOOKS:
            raise _unknown("update-rule hook", hook, list(HOOKS))
        return getattr(cls, hook) is not getattr(UpdateRule, hook)

    def before_step(self, params: Iterable[torch.Tensor], progress: float, scale_of: ScaleFn | None = None):
        """Before the optimizer step (the gradient is already computed)."""

    def after_step(self, params: Iterable[torch.Tensor], progress: float, scale_of: ScaleFn | None = None):
        """After the optimizer step."""

    def finalize(self, params: Iterable[torch.Tensor], scale_of: ScaleFn | None = None):
        """Called once after training (PTB binarizes here)."""


def prox_step(rule: UpdateRule, params: Iterable[torch.Tensor], progress: float, scale_of: ScaleFn | None) -> None:
    """w <- s L_rho(w / s) in place for every latent, rho and varrho at `progress` (ProxQuant's, reverse PC's map)."""
    v = rule.values(progress)
    for p in params:
        apply_scaled(p, scale_of, lambda x: prox_linear(x, v["rho"], v["varrho"]))


@register
class PCPlusPlus(UpdateRule):
    """PC++ (eq. 7): the pair does all the work; the optimizer steps the latent weights."""

    name = "pc++"


@register
class ProxQuant(UpdateRule):
    """ProxQuant: w_{t+1} = L_rho(w_t - eta grad l(w_t)); rho 0.01 -> 10 linear (section 4.1)."""

    name = "pq"
    training_quantizer = "fp"
    schedules = {"rho": linear(0.01, 10.0), "varrho": constant(0.0)}

    def after_step(self, params, progress, scale_of=None):
        prox_step(self, params, progress, scale_of)


@register
class ReversePC(UpdateRule):
    """Reverse PC: w*_{t+1} = L_rho(w*_t) - eta grad l(w*_t); the gradient is computed before the map."""

    name = "rpc"
    training_quantizer = "fp"
    schedules = {"rho": linear(0.01, 10.0), "varrho": constant(0.0)}

    def before_step(self, params, progress, scale_of=None):
        prox_step(self, params, progress, scale_of)

    def finalize(self, params, scale_of=None):
        """The point rPC evaluates is L_rho(w*) at the final rho (sign for rho >= 1), not the last step."""
        self.before_step(params, 1.0, scale_of)


@register
class PostTraining(UpdateRule):
    """PTB: train in full precision, binarize once at the end (w <- s sign(w / s))."""

    name = "ptb"
    training_quantizer = "fp"

    def finalize(self, params, scale_of=None):
        for p in params:
            apply_scaled(p, scale_of, sign)


class RuleOptimizer(torch.optim.Optimizer):
    """A torch optimizer with an update rule's hooks around its step (torchao PARQ's QuantOptimizer shape).

    `step()` = `before_step()`, the wrapped optimizer's step, `after_step()`; `finalize()` once at the end.
    The rule acts on `params` (the binarized latents) at the progress last given to `set_progress`.
    Everything else (param_groups, state, zero_grad, state_dict) is the wrapped optimizer's.

    When something else steps the wrapped optimizer (the training engine: DeepSpeed's `engine.step()`
    runs its ZeRO optimizer, which steps flat fp32 partitions rather than the model's tensors), the
    caller runs `before_step()` / `after_step()` around that step itself: the same hooks, in the same
    order. `sync`, when given, runs after a hook that changed the parameters (a rule that overrides it,
    `UpdateRule.acts`), so that an optimizer's own copies follow (DeepSpeed: `refresh_fp32_params`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rule: UpdateRule, params: Iterable[torch.Tensor],
                 scale_of: ScaleFn | None = None, *, sync: Callable[[], None] | None = None):
        # No Optimizer.__init__: the groups, state and hooks are the wrapped optimizer's, not copies.
        self.optimizer = optimizer
        self.rule = rule
        self.params = list(params)
        self.scale_of = scale_of
        self.sync = sync
        self.progress = 0.0

    # -- the wrapped optimizer's state -------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def __getattr__(self, item):  # only for names this class does not define (hook registries, ...)
        if item == "optimizer":
            raise AttributeError(item)
        return getattr(self.optimizer, item)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"RuleOptimizer(rule={self.rule.name!r}, {len(self.params)} params, {self.optimizer!r})"

    # -- the rule ----------------------------------------------------------------------------------
    def set_progress(self, progress: float) -> RuleOptimizer:
        """The training progress in [0, 1] the next hooks run at (ValueError outside)."""
        self.progress = check_progress(progress)
        return self

    def _run(self, hook: str, *args) -> None:
        if not self.rule.acts(hook):
            return
        getattr(self.rule, hook)(self.params, *args, self.scale_of)
        if self.sync is not None:
            self.sync()

    def before_step(self) -> None:
        self._run("before_step", self.progress)

    def after_step(self) -> None:
        self._run("after_step", self.progress)

    def finalize(self) -> None:
        self._run("finalize")

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.before_step()
        self.optimizer.step()
        self.after_step()
        return loss
