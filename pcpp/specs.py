"""Quantizer specs of the binarized layers: a name, a {'name': .., params..} dict, a Quantizer, or None.

Kept apart from pcpp.layers so that surgery validates a spec without building a layer.
"""

from __future__ import annotations

import copy

from pcpp import quantizers
from pcpp.quantizers import Quantizer
from pcpp.schedules import Schedule, constant, loglinear

# Default schedules of a pair when it binarizes activations (a layer's input), where they differ from the
# pair's registered ones (which are the weights'). bnn++ on weights: mu log-linear 1.25 -> 30.4 (pairs.py).
# On activations SS'_mu is negative beyond |x| > 2.4 / mu, and every binarized activation multiplies the
# backward signal of all the layers before it: past mu ~ 10 the chained gradient is carried by the few
# inputs inside |x| < 0.24 and training stalls, while the honest sign needs no larger mu once the BatchNorm
# statistics are re-estimated under it (pcpp.calibration.recalibrate_batchnorm_). ResNet-20 BWA fine-tuned
# from the teacher, one epoch, `pcpp train`, honest accuracy on the 10k test set (docs/activations.md):
# activations' mu 0.5 -> 30: 36.8% (forward 38.0%), 0.5 -> 10: 40.0% (39.7%), 0.5 -> 5: 37.6% (47.2%: too soft
# at the end, the sign network is another one). The `pcpp sweep` study sweep_bwa_mu_short.yaml (10 trials, Optuna
# TPE, 10,000 images an epoch; docs/results/sweep_bwa_mu_short.md) found log-linear 0.51 -> 12.2 best: this one.
# bnn+ on activations: mu constant 2, not the paper's 5 (its weights keep 5). BNN+'s forward is sign, so mu
# shapes only the backward; at 5 most activations of unit scale sit beyond |x| = 0.48, where SS'_5 is
# negative and small. sweep_bnnp_act_mu_short.yaml (BWA, bnn+ weights and activations, the budget above, a grid
# of constant mu; docs/results/sweep_bnnp_act_mu.md): 0.5: 38.35%, 1: 41.90%, 2: 43.15%, 5: 31.35% honest.
ACTIVATION_SCHEDULES: dict[str, dict[str, Schedule]] = {"bnn++": {"mu": loglinear(0.5, 10.0)},
                                                        "bnn+": {"mu": constant(2.0)}}
ROLES = ("weight", "activation")


def make_quantizer(spec, role: str = "weight") -> Quantizer | None:
    """A Quantizer from a name, a {'name': .., params..} dict, a Quantizer (copied state), or None.

    role: "weight" or "activation"; for "activation" a name or dict gets the pair's activation defaults
    (ACTIVATION_SCHEDULES) for the parameters it does not set. A Quantizer instance is copied as is.
    """
    if role not in ROLES:
        raise ValueError(f"unknown quantizer role {role!r}; valid: {', '.join(ROLES)}")
    if spec is None:
        return None
    if isinstance(spec, Quantizer):
        return copy.deepcopy(spec)  # one instance per layer: schedules and ReAct's beta are per layer
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"a quantizer spec dict needs a 'name' key, got {spec!r}")
        name = spec.pop("name")
        defaults = ACTIVATION_SCHEDULES.get(name, {}) if role == "activation" else {}
        return quantizers.get(name, **{**defaults, **spec})
    raise ValueError(f"cannot make a quantizer from {spec!r}: give a name, a dict with 'name', or None")


def default_schedules(name: str, role: str = "weight") -> dict[str, Schedule]:
    """The schedules pair `name` gets by default in `role` (registered ones, then the role's overrides)."""
    q = make_quantizer(name, role)
    return dict(q.param_schedules)


def activation_pair(spec, channels: int) -> tuple[Quantizer | None, float | None]:
    """(the layer's activation pair, the init of a learnable threshold it asks for, or None).

    ReAct's `learnable_beta` asks for a per-channel learnable beta: inside a layer that is the layer's
    `act_threshold`, sized from the layer (a `channels` that disagrees is refused), and the pair keeps a
    fixed beta of 0 so that the shift is applied once.
    """
    q = make_quantizer(spec, "activation")
    if q is None or not q.opts.get("learnable_beta"):
        return q, None
    wanted = q.opts.get("channels")
    if wanted is not None and wanted != channels:
        raise ValueError(f"activation pair {q.name!r} asks for channels={wanted}, but this layer's input has "
                         f"{channels} channels: drop 'channels' (the threshold is sized from each layer)")
    return quantizers.get(q.name), float(q.param_schedules["beta"](0.0))
