"""The paper's binarization tasks (section 4), named once: BW, BWA, BWAA (and FP for no binarization).

- BW: binarized weights (sign(w*) times a scale), full-precision activations.
- BWA: binarized weights and activations (the activation pair on signed inputs, pcpp.placement).
- BWAA: BWA plus 8-bit accumulators (WrapNet's cyclic overflow of the +-1 dot products, pcpp.accumulators).

`spec(task, ...)` gives the binarization spec keys (pcpp.surgery.BinarizeSpec) of a task; `task_of` reads
the task back from a spec's activation and accumulator settings.
"""

from __future__ import annotations

from pcpp.registry import unknown

BW, BWA, BWAA = "BW", "BWA", "BWAA"
TASKS = (BW, BWA, BWAA)
FP = "FP"  # a run without binarization (the reference column of the result tables)
ACCUMULATOR_BITS = 8  # BWAA's accumulator width (WrapNet)
DEFAULT_PAIR = "bnn++"  # the paper's proposed pair, for weights and activations alike

# What each task sets in a binarization spec, besides the weight pair.
SPEC_DEFAULTS: dict[str, dict] = {
    BW: {"activation": None, "accumulator_bits": None},
    BWA: {"activation": DEFAULT_PAIR, "accumulator_bits": None},
    BWAA: {"activation": DEFAULT_PAIR, "accumulator_bits": ACCUMULATOR_BITS},
}


def check(task: str) -> str:
    """`task` itself when it is BW, BWA or BWAA; ValueError listing them otherwise."""
    if task not in TASKS:
        raise unknown("task", task, list(TASKS))
    return task


def task_of(activation, accumulator_bits: int | None) -> str:
    """The task of a spec: BW without an activation pair, BWAA with accumulator bits, else BWA."""
    if activation is None:
        return BW
    return BWAA if accumulator_bits else BWA


def spec(task: str, weight: str | dict = DEFAULT_PAIR, activation: str | dict | None = None, **extra) -> dict:
    """The BinarizeSpec keys of `task`: {"weight", "activation", "accumulator_bits", **extra}.

    The activation pair defaults to the weight pair under BWA / BWAA (`activation` chooses another);
    `extra` adds or overrides other spec keys (units, scaling, activation_placement, ...). Raises
    ValueError for an unknown task, or an activation pair given for BW.
    """
    defaults = SPEC_DEFAULTS[check(task)]
    if task == BW and activation is not None:
        raise ValueError(f"task BW binarizes weights only, got activation={activation!r}: use BWA or BWAA")
    act = None if task == BW else (activation if activation is not None else weight)
    return {"weight": weight, "activation": act, "accumulator_bits": defaults["accumulator_bits"], **extra}


def layer_kwargs(task: str, pair: str | dict = DEFAULT_PAIR) -> dict:
    """Constructor keywords of a binarized layer (pcpp.layers) for `task`: act_quantizer, accumulator_bits."""
    s = spec(task, pair)
    return {"act_quantizer": s["activation"], "accumulator_bits": s["accumulator_bits"]}
