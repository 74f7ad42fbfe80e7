"""Fixed cost of a training run: one 1-epoch `pcpp train --profile-startup` on 10,000 CIFAR-10 images.

PYTHONPATH=. .venv/bin/python bench/startup.py [--train data/cifar10/train] [--test data/cifar10/test]
    [--images 10000] [KEY=VALUE ...]        (overrides go to `pcpp train`, e.g. data.eval_limit=2000)

The shards: `pcpp prepare ../shared/data/cifar10-jpeg/train.tar data/cifar10/train` (and test.tar), the full
CIFAR-10 (a smaller set is cycled through to make up the epoch's images).

Runs `pcpp train pipelines/configs/resnet20_ft_bnnpp.yaml` (ResNet-20 FT from the teacher, BNN++ weights, one
CPU worker, DeepSpeed ZeRO-1) in a fresh process with a new run root, prints the phase table of
`--profile-startup` (stages.profile: the driver's phases, Ray Train's start-up and tear-down, rank 0's phases)
and the wall time measured from outside, and the ratio wall / epoch time (the epoch's training steps, what
the epoch line reports). Everything that is not the epoch's steps is fixed cost: a sweep trial pays all of it
but Ray's start and shutdown again.

Measured on the 2-core development machine while other jobs held both cores (load average 6-15), so seconds
are loose and only the ratios within one run compare (issue 11's run on a quieter machine: 63 s wall, 28 s
epoch). Phases in seconds; "eval" is the forward and honest passes over the test set plus the BatchNorm
re-estimation (50 training batches by default), "rest" everything else but the epoch's steps. The config was
the one before b4932e1 (Adam lr 1e-3, no distillation); since then it distils from the teacher, which adds a
teacher forward to every step and a teacher build to the worker's setup.

Before (71da517 with the profiling alone added; the full 10,000-image test set), `pcpp train` as above by hand:
    pcpp start 3.80, import Ray Train 3.54, checks (with the driver's real model build) 0.09, Ray start 13.85,
    MLflow run start (new store) 8.67, Ray Train start 24.00, import DeepSpeed 2.27, model build 0.11,
    calibration + DeepSpeed init (shm op loaded) 4.86, restore 1.10, eval 200.59 (BatchNorm 79.75),
    checkpoint 0.02, epoch log 0.59, report 1.00, Ray Train end 2.67, MLflow 0.05, Ray shutdown 1.66.
    wall 535.3 s, epoch 266.0 s, fixed 269.2 s (eval 200.6, rest 68.6): wall / epoch 2.01.
After (this script; the store made beforehand):
    bench/startup.py --train /work/data/cifar10/train --test /work/data/cifar10/test
    pcpp start 2.85, import Ray Train 1.83, checks (model on the meta device) 0.03, Ray start 11.36, MLflow run
    start 2.73, Ray Train start 13.62, import DeepSpeed 2.53, model build 0.17, calibration + DeepSpeed init 2.77,
    restore 1.01, eval 112.27 (BatchNorm 38.49), checkpoint 0.01, epoch log 0.13, report 1.69, Ray Train end
    2.64, MLflow 0.09, Ray shutdown 1.60.
    wall 347.8 s, epoch 190.0 s, fixed 157.8 s (eval 112.3, rest 45.5): wall / epoch 1.83.
    ... data.eval_limit=2000 algorithm.bn_recalibration_batches=10 (a lighter evaluation):
    eval 22.67 (BatchNorm 7.56), rest 40.3; wall 246.9 s, epoch 183.9 s: wall / epoch 1.34.
Quiet (c13eb76, the other job stopped for the run, load average 2.5 from its idle Ray processes), the same command:
    pcpp start 2.12, import Ray Train 1.01, checks 0.03, Ray start 7.62, MLflow run start 1.48, Ray Train start
    8.99, import DeepSpeed 1.03, model build 0.09, calibration + DeepSpeed init 2.36, restore 0.88, eval 33.89
    (BatchNorm 11.06), checkpoint 0.01, epoch log 0.06, report 0.20, Ray Train end 2.41, MLflow 0.03, Ray
    shutdown 1.64.
    wall 108.0 s (109.2 s from outside), epoch 44.1 s, fixed 63.9 s (eval 33.9, rest 30.0): wall / epoch 2.45,
    wall / (epoch + eval) 1.38.
The evaluation is compute (about 26,000 forward passes against the epoch's 10,000 forward and backward ones),
not a fixed cost pcpp can drop; the rest is mostly Ray's and Ray Train's start-up (processes importing torch).
Issue 11's goal (wall within 1.3x of a 10k-image epoch) leaves 0.3 x 44 = 13 s for everything but the
epoch's steps on a quiet machine; Ray's start (7.6 s) and Ray Train's worker group (9.0 s) alone take 16.6 s,
so it is out of reach while a run is a Ray Train job. A sweep pays Ray's start once, not per trial.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from stages.profile import EPOCHS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pipelines" / "configs" / "resnet20_ft_bnnpp.yaml"
DATA = REPO / "data" / "cifar10"  # where the README's `pcpp prepare` lines put them
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "MPLBACKEND": "Agg"}


def command(train: Path, test: Path, images: int, root: Path, overrides: list[str]) -> list[str]:
    pcpp = Path(sys.executable).with_name("pcpp")
    return [str(pcpp), "train", str(CONFIG), f"data.train={train}", f"data.test={test}",
            f"data.epoch_length={images}", f"tracking.run_root={root}", *overrides, "--profile-startup"]


def table(output: str) -> list[str]:
    """The phase table `--profile-startup` prints last (from its header line on)."""
    lines = output.splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("phase ")), default=None)
    return [] if start is None else lines[start:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=DATA / "train", help="training shard directory")
    parser.add_argument("--test", type=Path, default=DATA / "test", help="test shard directory")
    parser.add_argument("--images", type=int, default=10000, help="training images in the epoch")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more `pcpp train` overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pcpp-bench-startup-") as tmp:
        root = Path(tmp) / "runs"
        root.mkdir()
        # The MLflow store's tables, made once per run root (4-6 s here), are not what every run pays.
        MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
        cmd = command(args.train.resolve(), args.test.resolve(), args.images, root, args.overrides)
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
        wall = time.perf_counter() - start
    rows = table(done.stdout)
    if done.returncode != 0 or not rows:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"pcpp train exited {done.returncode}", file=sys.stderr)
        return 1
    print("\n".join(rows))
    epochs = float(next(line[len(EPOCHS):].split()[0] for line in rows if line.startswith(EPOCHS)))
    print(f"wall measured outside: {wall:.2f} s; wall / epochs {wall / max(epochs, 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
