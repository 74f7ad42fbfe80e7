"""Quantizer specs of the binarized layers: a name, a {'name': .., params..} dict, a Quantizer, or None.

Kept apart from pcpp.layers so that surgery validates a spec without building a layer.
"""

from __future__ import annotations

import copy

from pcpp import quantizers
from pcpp.quantizers import Quantizer


def make_quantizer(spec) -> Quantizer | None:
    """A Quantizer from a name, a {'name': .., params..} dict, a Quantizer (copied state), or None."""
    if spec is None:
        return None
    if isinstance(spec, Quantizer):
        return copy.deepcopy(spec)  # one instance per layer: schedules and ReAct's beta are per layer
    if isinstance(spec, str):
        return quantizers.get(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"a quantizer spec dict needs a 'name' key, got {spec!r}")
        return quantizers.get(spec.pop("name"), **spec)
    raise ValueError(f"cannot make a quantizer from {spec!r}: give a name, a dict with 'name', or None")


def activation_pair(spec, channels: int) -> tuple[Quantizer | None, float | None]:
    """(the layer's activation pair, the init of a learnable threshold it asks for, or None).

    ReAct's `learnable_beta` asks for a per-channel learnable beta: inside a layer that is the layer's
    `act_threshold`, sized from the layer (a `channels` that disagrees is refused), and the pair keeps a
    fixed beta of 0 so that the shift is applied once.
    """
    q = make_quantizer(spec)
    if q is None or not q.opts.get("learnable_beta"):
        return q, None
    wanted = q.opts.get("channels")
    if wanted is not None and wanted != channels:
        raise ValueError(f"activation pair {q.name!r} asks for channels={wanted}, but this layer's input has "
                         f"{channels} channels: drop 'channels' (the threshold is sized from each layer)")
    return quantizers.get(q.name), float(q.param_schedules["beta"](0.0))
