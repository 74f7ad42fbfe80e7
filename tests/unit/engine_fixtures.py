"""Fixtures of the unit tests that run the training engine in this process (stages.training.TrainingRun).

Imported by name into the test modules that use them (a tests/unit/conftest.py would shadow the
`conftest` module that integration tests import helpers from)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny train / test shard sets: 4 colour classes of 32x32 JPEGs."""
    from stages.data import prepare

    root = tmp_path_factory.mktemp("shards")
    colours = np.random.default_rng(0).uniform(40, 215, size=(4, 3))
    out = []
    for split, n in (("train", 8), ("test", 4)):
        rng = np.random.default_rng(len(split))
        for c in range(4):
            d = root / "img" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg")
        prepare(root / "img" / split, root / split, shard_size=2 * n, progress=False)
        out.append(root / split)
    return out


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group on the loopback interface, with an in-memory store (no listening socket),
    kept for the whole session: DeepSpeed caches the world group of its first engine."""
    import torch.distributed as dist

    from cluster.train_backend import loopback_interface

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOO_SOCKET_IFNAME", loopback_interface())
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
            mp.setenv(key, value)
        created = not dist.is_initialized()  # each module that imports the fixture gets its own instance
        if created:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        yield
        if created:
            dist.destroy_process_group()
