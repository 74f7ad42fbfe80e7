"""Where the wall time of a training run goes: a phase timer and the table `pcpp train --profile-startup` prints.

A run's fixed cost is everything but its epochs' training steps: Ray and Ray Train start-up, the model build,
DeepSpeed's initialisation, evaluation, checkpoints, MLflow, shutdown. The driver (stages.engine.fit) and rank 0
of the workers each keep a `PhaseTimer`; the worker's phases come back through `<run dir>/profile.json`, with the
wall-clock times (time.time) it entered and left the training function, from which the driver derives Ray
Train's own start-up and tear-down. Seconds are time.perf_counter differences; nothing here is a benchmark
harness, just where the time went in one run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PROFILE = "profile.json"  # rank 0's phases, in the run directory
EPOCHS = "epochs (training steps)"  # the phase that is not fixed cost


def process_start() -> float:
    """When this process started (time.time() scale): the interpreter's own start-up counts too."""
    import psutil

    return psutil.Process().create_time()


class PhaseTimer:
    """Seconds per named phase, summed over repeats, in the order first started.

    `phase(name)` times a block; `mark(name)` gives `name` the time since the previous mark or phase end (a
    sequence of steps timed without indenting them); `add` records a span measured elsewhere.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.seconds.setdefault(name, 0.0)  # listed where it starts: a phase nested in it comes after it
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last = time.perf_counter()
            self.add(name, self._last - start)

    def mark(self, name: str | None = None) -> None:
        """The time since the previous mark (or phase end, or the timer's creation) is `name`'s; None drops it."""
        now = time.perf_counter()
        if name is not None:
            self.add(name, now - self._last)
        self._last = now


def format_table(phases: dict[str, float], wall: float, epochs: float) -> str:
    """One line per phase (seconds and share of `wall`; a name that starts with two spaces is part of the phase
    above it), the time no phase covers, then the wall time, the epochs' training steps, the fixed cost
    (wall - epochs) and the ratio wall / epochs."""
    untimed = wall - sum(s for name, s in phases.items() if not name.startswith("  "))
    rows = [*phases.items(), ("not timed", untimed)]
    width = max(len(name) for name, _ in rows + [("fixed cost (wall - epochs)", 0.0)])
    lines = [f"{'phase':<{width}}  {'seconds':>8}  {'% wall':>6}"]
    lines += [f"{name:<{width}}  {s:>8.2f}  {100 * s / max(wall, 1e-9):>6.1f}" for name, s in rows]
    lines += [f"{'wall':<{width}}  {wall:>8.2f}",
              f"{EPOCHS:<{width}}  {epochs:>8.2f}",
              f"{'fixed cost (wall - epochs)':<{width}}  {wall - epochs:>8.2f}",
              f"{'wall / epochs':<{width}}  " + (f"{wall / epochs:>8.2f}" if epochs > 0 else f"{'n/a':>8}")]
    return "\n".join(lines)
