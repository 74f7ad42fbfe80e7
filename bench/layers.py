"""Training-step cost of binarized layers: binarized / full-precision step time for ResNet-20 and DeiT-T.

One step is forward + cross-entropy + backward + SGD step, on random CIFAR-sized inputs. After 2 warm-up
steps, the median of --steps steps (configurations taking turns) is reported for BW (bnn++ weights),
BWA (bnn++ weights and activations) and BWAA (plus 8-bit accumulators), each against the same model in
full precision.

PYTHONPATH=. .venv/bin/python bench/layers.py [--steps 5] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from pcpp import models, tasks
from pcpp.surgery import binarize_

MODELS = {
    "ResNet-20": ("resnet20", {}),
    "DeiT-T": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10}),
}
TASKS = {task: tasks.spec(task, "bnn++") for task in tasks.TASKS}  # bnn++ weights (and activations)
WARMUP = 2


class Stepper:
    """One model with its optimizer and a fixed batch; `step()` returns the seconds of one training step."""

    def __init__(self, model: torch.nn.Module, batch: int):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        return time.perf_counter() - start


def step_times(steppers: dict[str, Stepper], steps: int) -> dict[str, list[float]]:
    """Step times per configuration, after WARMUP steps each.

    Configurations take turns step by step, so a change in background load hits all of them alike.
    """
    for s in steppers.values():
        for _ in range(WARMUP):
            s.step()
    times = {k: [] for k in steppers}
    for _ in range(steps):
        for k, s in steppers.items():
            times[k].append(s.step())
    return times


def build(name: str, kwargs: dict, spec: dict | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create(name, **kwargs)
    if spec is not None:
        binarize_(model, spec)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"training step (fwd + bwd + SGD), batch {args.batch}, median of {args.steps} after {WARMUP} warm-up, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    # The median is the figure; the ratio of minima is shown beside it because on a shared CPU other
    # processes only ever add time, so the minima are the less disturbed estimate.
    header = f"{'model':<10}  {'task':<5}  {'fp s/step':>9}  {'bin s/step':>10}  {'bin / fp':>8}  {'(min ratio)':>11}"
    print(header)
    print("-" * len(header))
    for label, (name, kwargs) in MODELS.items():
        if label not in args.models:
            continue
        steppers = {"FP": Stepper(build(name, kwargs, None), args.batch)}
        steppers.update({task: Stepper(build(name, kwargs, spec), args.batch) for task, spec in TASKS.items()})
        times = step_times(steppers, args.steps)
        fp = statistics.median(times["FP"])
        for task in TASKS:
            binary = statistics.median(times[task])
            min_ratio = min(times[task]) / min(times["FP"])
            print(
                f"{label:<10}  {task:<5}  {fp:>9.3f}  {binary:>10.3f}  {binary / fp:>7.2f}x  {min_ratio:>10.2f}x",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the CPU make times noisy)")


if __name__ == "__main__":
    main()
