"""Shard loader vs torchvision ImageFolder: images/s over one training pass of the same JPEG files.

PYTHONPATH=. .venv/bin/python bench/loader.py [--tar ../shared/data/cifar10-jpeg/test.tar] [--num-workers 2]
"""

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from stages import data

DEFAULT_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "test.tar"


def _one_pass(loader) -> tuple[int, float]:
    start = time.perf_counter()
    images = 0
    for _, y in loader:
        images += len(y)
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="tar of an ImageFolder tree")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in DataLoader workers; keeps the main process from competing with them

    with tempfile.TemporaryDirectory(prefix="pcpp-bench-loader-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        with tarfile.open(args.tar) as tar:
            tar.extractall(tmp / "files", filter="data")
        (root,) = [p for p in (tmp / "files").iterdir() if p.is_dir()]
        extract_s = time.perf_counter() - start

        start = time.perf_counter()
        manifest = data.prepare(root, tmp / "shards", shard_size=args.shard_size, progress=False)
        prepare_s = time.perf_counter() - start

        normalize = transforms.Normalize(manifest["mean"], manifest["std"])
        folder = datasets.ImageFolder(
            root,
            transforms.Compose(
                [
                    transforms.RandomCrop(32, padding=4),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
        )
        folder_loader = DataLoader(
            folder, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, drop_last=True
        )
        shard_loader = data.make_loader(
            tmp / "shards", train=True, batch_size=args.batch_size, num_workers=args.num_workers
        )
        folder_n, folder_s = _one_pass(folder_loader)
        shard_n, shard_s = _one_pass(shard_loader)

    print(f"source        {args.tar} ({manifest['num_samples']} images, {len(manifest['shards'])} shards)")
    print(f"setup         extract {extract_s:.2f} s, prepare (decode + hash + write) {prepare_s:.2f} s")
    print(f"settings      batch {args.batch_size}, num_workers {args.num_workers}, train augmentation, one pass")
    print(f"ImageFolder   {folder_n} images in {folder_s:.2f} s = {folder_n / folder_s:8.0f} images/s")
    print(f"shard loader  {shard_n} images in {shard_s:.2f} s = {shard_n / shard_s:8.0f} images/s")
    print(f"ratio         {folder_s / shard_s * shard_n / folder_n:.2f}x (shards / ImageFolder)")


if __name__ == "__main__":
    main()
