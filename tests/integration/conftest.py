"""Shared fixtures of the integration tier: a loopback Ray and small real shard sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_image_folder(root: Path, per_class: int, classes: int = 4, seed: int = 0) -> Path:
    """A learnable image set: each class a dominant colour plus noise, saved as real JPEGs."""
    colours = np.random.default_rng(1234).uniform(40, 215, size=(classes, 3))  # the same for every split
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(colours[c] + rng.normal(0, 35, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """(train, test) shard directories: 4 classes, 160 train / 80 test images, 4 shards each."""
    from stages.data import prepare

    root = tmp_path_factory.mktemp("tiny-data")
    out = {}
    for split, n in (("train", 40), ("test", 20)):
        src = make_image_folder(root / "img" / split, n, seed=0 if split == "train" else 1)
        prepare(src, root / split, shard_size=n, progress=False)
        out[split] = root / split
    return out["train"], out["test"]


@pytest.fixture(scope="session")
def local_ray():
    """One loopback Ray for the session, stopped at the end."""
    from cluster.local import ensure_ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = ensure_ray(num_cpus=8)  # logical CPUs: a sweep runs 2 trials, each a Train worker group
    yield ray
    ray.shutdown()
