"""Schedules: pure functions of training progress p in [0, 1] (`progress_at`: step / (total_steps - 1)).

The quantizers' and rules' parameter schedules (mu, rho, t, ...) and the learning rate alike.

A schedule is data (kind, start, end), so it serialises with a checkpoint and a resumed run continues
the same ramp (nanoGPT's rule: the value depends on the step, never on hidden state).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("constant", "linear", "loglinear")


def check_progress(progress: float) -> float:
    """Return `progress` as a float, refusing values outside [0, 1] (and NaN)."""
    p = float(progress)
    if not (0.0 <= p <= 1.0):  # also catches NaN
        raise ValueError(f"progress must lie in [0, 1] (step / total steps), got {progress!r}")
    return p



def progress_at(step: int, total_steps: int) -> float:
    """Training progress of optimizer step `step` (0-based) in a run of `total_steps` steps, in [0, 1].

    step / (total_steps - 1), so the first step runs at the schedules' start and the last at their end
    (mu reaches mu_T, rho reaches rho_T: the trained network is the binary one); clamped to 1 past the end.
    One step (or none) gives 0 for the first step.
    """
    if step < 0 or total_steps < 0:
        raise ValueError(f"progress needs step >= 0 and total_steps >= 0, got step={step}, total_steps={total_steps}")
    return min(step / max(total_steps - 1, 1), 1.0)


LR_SCHEDULES = ("cosine", "constant")


def learning_rate(base_lr: float, progress: float, kind: str = "cosine") -> float:
    """The optimizer's learning rate at training progress p in [0, 1] (the same p as the quantizers' schedules).

    cosine: 0.5 base_lr (1 + cos(pi p)), from base_lr at p = 0 to 0 at p = 1 (SGDR without restarts);
    constant: base_lr. Raises ValueError for another kind or a progress outside [0, 1].
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; valid: {', '.join(LR_SCHEDULES)}")
    p = check_progress(progress)
    if kind == "constant":
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Schedule:
    """value(p) for p in [0, 1].

    - constant: start (end ignored, kept equal to start)
    - linear: start + p * (end - start)
    - loglinear: start * (end / start) ** p, i.e. linear in log10 (IR-Net's / R-BNN's t = 10^(a + p (b - a)))
    """

    kind: str
    start: float
    end: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        for label, v in (("start", self.start), ("end", self.end)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{self.kind} schedule {label} must be a finite number, got {v!r}")
        if self.kind == "loglinear" and (self.start <= 0 or self.end <= 0):
            raise ValueError(
                f"loglinear schedule needs positive end points, got start={self.start}, end={self.end}"
            )
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "end", float(self.start if self.kind == "constant" else self.end))

    def __call__(self, progress: float) -> float:
        p = check_progress(progress)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + p * (self.end - self.start)
        return self.start * (self.end / self.start) ** p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        unknown = set(d) - {"kind", "start", "end"}
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(unknown)}; valid keys: kind, start, end")
        if "kind" not in d or "start" not in d:
            raise ValueError(f"a schedule needs 'kind' and 'start' (and 'end' unless constant), got {d!r}")
        return cls(d["kind"], d["start"], d.get("end", d["start"]))

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.start:g}"
        return f"{self.kind} {self.start:g} -> {self.end:g}"


def constant(value: float) -> Schedule:
    return Schedule("constant", value, value)


def linear(start: float, end: float) -> Schedule:
    return Schedule("linear", start, end)


def loglinear(start: float, end: float) -> Schedule:
    return Schedule("loglinear", start, end)


def as_schedule(value) -> Schedule:
    """Coerce a number, a dict or a Schedule to a Schedule (numbers become constants)."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, dict):
        return Schedule.from_dict(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return constant(value)
    raise ValueError(f"cannot make a schedule from {value!r}: give a number, a Schedule or "
                     "{'kind': 'linear'|'loglinear'|'constant', 'start': .., 'end': ..}")
