"""`stages.data.prepare` throughput by source kind: the same images as .tar.gz, .tar and folder.

PYTHONPATH=. .venv/bin/python bench/prepare.py [--src pipelines/demo_data/cifar10-train-4000.tar.gz] [--repeat 3]

Prints images/s of one `prepare` call on the source as given, and on its images re-packed as .tar.gz
(gzip level 6), as .tar and extracted to a folder (decode, statistics, hashing and shard writing included; progress
bar off) per source kind, best of `--repeat` runs. A figure, not an assertion: CI does not run it.
"""

import argparse
import gzip
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from stages import data

DEFAULT_SRC = Path(__file__).resolve().parents[1] / "pipelines" / "demo_data" / "cifar10-train-4000.tar.gz"


def _time_prepare(src: Path, out: Path, shard_size: int, repeat: int) -> tuple[int, float]:
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        manifest = data.prepare(src, out, shard_size=shard_size, progress=False)
        best = min(best, time.perf_counter() - start)
    return manifest["num_samples"], best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="a tar or tar.gz of an ImageFolder tree")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pcpp-bench-prepare-") as tmp:
        tmp = Path(tmp)
        plain, packed, folder = tmp / "src.tar", tmp / "src.tar.gz", tmp / "folder"
        with tarfile.open(args.src) as tar:  # the same members whatever the source's compression
            tar.extractall(folder, filter="data")
        with tarfile.open(plain, "w") as tar:
            for child in sorted(folder.iterdir()):
                tar.add(child, arcname=child.name)
        with open(plain, "rb") as f, gzip.open(packed, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
        tops = [p for p in folder.iterdir() if p.is_dir()]
        root = tops[0] if len(tops) == 1 else folder  # the ImageFolder root, under its wrapper if any
        print(f"source {args.src}, shard_size {args.shard_size}, best of {args.repeat}")
        for kind, src in (("given", args.src), ("tar.gz", packed), ("tar", plain), ("folder", root)):
            n, seconds = _time_prepare(src, tmp / f"out-{kind}", args.shard_size, args.repeat)
            print(f"{kind:7s} {n} images in {seconds:6.2f} s = {n / seconds:7.0f} images/s")


if __name__ == "__main__":
    main()
