"""Random-pixel JPEG shard sets for unit tests that need real webdataset shards but no learnable data.

A plain module imported by name (a tests/unit/conftest.py would shadow the integration tests' `conftest`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def random_jpeg_shards(root: Path, per_class: int, shard_size: int, classes: int = 4) -> tuple[Path, Path]:
    """(train, test) shard directories under `root`: `per_class` 8x8 random JPEGs per class and split."""
    from stages.data import prepare

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / "img" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        prepare(root / "img" / split, root / split, shard_size=shard_size, progress=False)
    return root / "train", root / "test"
