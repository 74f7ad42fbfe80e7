"""Training-step cost of binarized layers: binarized / full-precision step time for ResNet-20 and DeiT-T.

One step is forward + cross-entropy + backward + SGD step, on random CIFAR-sized inputs. After 2 warm-up
steps (where the fused kernels compile: their time is printed), --steps rounds in which every configuration
takes one step in turn; reported for BW (bnn++ weights), BWA (bnn++ weights and activations) and BWAA (plus
8-bit accumulators), each against the same model in full precision: the ratio of medians and the ratio of
minima over the rounds (on a shared CPU other processes only ever add time: the minima are the less
disturbed estimate). The CPU-time ratio (this process's CPU seconds, both threads) is printed too: time spent
waiting for a core under load does not count there, spinning at a parallel region's barrier does.

--kernels chooses pcpp.kernels' path for the binarized models (default: PCPP_FUSED's, normally auto); several
paths (e.g. `--kernels auto reference`) are measured in the same rounds, so their ratios compare directly.

PYTHONPATH=. .venv/bin/python bench/layers.py [--steps 5] [--batch 128] [--threads 2] [--kernels auto reference]

Measured (--steps 10 --batch 128 --threads 2 --kernels auto reference, 2 shared cores under load average 3-4;
min ratio over rounds, fused (auto) / unfused (reference)): ResNet-20 BW 1.06 / 1.06, BWA 1.20 / 1.56, BWAA
1.31 / 1.85; DeiT-T BW 1.00 / 1.02, BWA 1.13 / 1.37, BWAA 1.20 / 1.62. With --threads 1 (no core to wait for):
ResNet-20 BW 0.98, BWA 1.10, BWAA 1.14; DeiT-T BW 1.03, BWA 1.13, BWAA 1.21.
With bnn++'s tanh through exp in compiled CPU kernels (pcpp.quantizers.functions.tanh; --steps 10, 2 threads, the
machine's other job paused, load average 2-3, min ratio auto / reference): ResNet-20 BW 1.01 / 1.04, BWA 1.17 /
1.54, BWAA 1.22 / 1.77; DeiT-T BW 1.01 / 1.04, BWA 1.11 / 1.47, BWAA 1.20 / 1.76. The same conditions just
before that change: ResNet-20 1.04, 1.21, 1.31; DeiT-T 1.01, 1.17, 1.25.
Run to run, same conditions (`--models ResNet-20`, other job paused, load 2.5-2.9; at f490bd4 and 27b9df3):
BW 1.08 / 1.03, BWA 1.18 / 1.16 (CPU-time ratio 1.18 / 1.15), BWAA 1.35 / 1.22: on this machine a ratio is
good to a few hundredths at best.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from pcpp import kernels, models, tasks
from pcpp.surgery import binarize_

MODELS = {
    "ResNet-20": ("resnet20", {}),
    "DeiT-T": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10}),
}
TASKS = {task: tasks.spec(task, "bnn++") for task in tasks.TASKS}  # bnn++ weights (and activations)
WARMUP = 2
FP = ("FP", "-")


class Stepper:
    """One model with its optimizer, a fixed batch and a kernels path; `step()` returns one step's seconds."""

    def __init__(self, model: torch.nn.Module, batch: int, path: str = "auto"):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.path = path

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one training step."""
        with kernels.using(self.path):
            start, cpu = time.perf_counter(), time.process_time()
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()
            return time.perf_counter() - start, time.process_time() - cpu


def step_times(steppers: dict, steps: int) -> tuple[dict, dict, dict]:
    """(warm-up wall seconds, step wall times, step CPU times) per configuration.

    Configurations take turns step by step, so a change in background load hits all of them alike.
    """
    warmup = {k: sum(s.step()[0] for _ in range(WARMUP)) for k, s in steppers.items()}
    wall, cpu = {k: [] for k in steppers}, {k: [] for k in steppers}
    for _ in range(steps):
        for k, s in steppers.items():
            w, c = s.step()
            wall[k].append(w)
            cpu[k].append(c)
    return warmup, wall, cpu


def build(name: str, kwargs: dict, spec: dict | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create(name, **kwargs)
    if spec is not None:
        binarize_(model, spec)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step per configuration each)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--kernels", nargs="+", default=[kernels.mode()], choices=kernels.MODES,
                        help="pcpp.kernels path(s) of the binarized models, measured in the same rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"training step (fwd + bwd + SGD), batch {args.batch}, {args.steps} rounds after {WARMUP} warm-up steps, "
          f"{args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    header = (f"{'model':<10}  {'task':<5}  {'kernels':<9}  {'fp s/step':>9}  {'bin s/step':>10}  "
              f"{'median ratio':>12}  {'min ratio':>9}  {'min cpu ratio':>13}  {'warm-up s':>9}")
    print(header)
    print("-" * len(header))
    for label, (name, kwargs) in MODELS.items():
        if label not in args.models:
            continue
        steppers = {FP: Stepper(build(name, kwargs, None), args.batch)}
        for task in args.tasks:
            for path in args.kernels:
                steppers[(task, path)] = Stepper(build(name, kwargs, TASKS[task]), args.batch, path)
        warmup, times, cpu = step_times(steppers, args.steps)
        fp, fp_min, fp_cpu = statistics.median(times[FP]), min(times[FP]), min(cpu[FP])
        for key, t in times.items():
            if key == FP:
                continue
            binary = statistics.median(t)
            print(f"{label:<10}  {key[0]:<5}  {key[1]:<9}  {fp:>9.3f}  {binary:>10.3f}  {binary / fp:>11.2f}x  "
                  f"{min(t) / fp_min:>8.2f}x  {min(cpu[key]) / fp_cpu:>12.2f}x  {warmup[key]:>9.1f}", flush=True)
    failures = kernels.compile_failures()
    if failures:
        print(f"torch.compile failed, fused kernels ran eagerly: {failures}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the CPU make times noisy)")


if __name__ == "__main__":
    main()
