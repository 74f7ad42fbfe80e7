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
are loose and only one run's ratios compare. Issue 11's run on a quieter machine: 63 s wall, 28 s epoch.

Before (71da517, the profiling alone added), full 10k test set:
    pcpp train pipelines/configs/resnet20_ft_bnnpp.yaml data.train=/work/data/cifar10/train
        data.test=/work/data/cifar10/test data.epoch_length=10000 tracking.run_root=/tmp/startup/before
        --profile-startup
    pcpp start (interpreter, imports) 3.80, driver: import Ray Train 3.54, checks (incl. the driver's real model
    build) 0.09, Ray start 13.85, MLflow run start (new store) 8.67, Ray Train start 24.00, import DeepSpeed 2.27,
    model build 0.11, calibration + DeepSpeed init (shm op load) 4.86, restore (worker's MLflow client) 1.10,
    epochs 266.02, evaluation 200.59 (of which BatchNorm re-estimation 79.75), checkpoint 0.02, epoch log 0.59,
    report 1.00, Ray Train end 2.67, driver MLflow 0.05, Ray shutdown 1.66.
    wall 535.3 s, fixed cost 269.2 s (evaluation 200.6, the rest 68.6), wall / epochs 2.01.

After: see the report of issue 11 item 2 (figures appended here by whoever reruns it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
        cmd = command(args.train.resolve(), args.test.resolve(), args.images, Path(tmp) / "runs", args.overrides)
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
    epochs = float(next(line.split()[-1] for line in rows if line.startswith("epochs (training steps)")))
    print(f"wall measured outside: {wall:.2f} s; wall / epochs {wall / max(epochs, 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
