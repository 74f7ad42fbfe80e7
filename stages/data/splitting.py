"""Distributed splitting of a shard list: by rank (node), then by DataLoader worker, per (seed, epoch).

Pure functions of their arguments, so every rank computes the same assignment without talking to the
others; `quotas` splits a fixed epoch length over unequal shares.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence


def node_split(shards: Sequence, rank: int, world_size: int) -> list:
    """The shards of `rank`: every world_size-th one, starting at rank."""
    return list(shards[rank::world_size])


def worker_split(shards: Sequence, worker: int, num_workers: int) -> list:
    """The shards of DataLoader `worker` among a rank's shards."""
    return list(shards[worker::num_workers])


def seed_of(*parts) -> int:
    # stable across processes and Python runs, unlike hash()
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def epoch_order(shards: Sequence, *, epoch: int, seed: int, shuffle: bool) -> list:
    order = list(shards)
    if shuffle:
        random.Random(seed_of(seed, epoch, "shards")).shuffle(order)
    return order


def assign_shards(
    shards: Sequence,
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
) -> list:
    """The shards read by (rank, worker) in `epoch`, in reading order.

    All ranks permute the shard list with the same (seed, epoch) seed and split the result, so each
    shard goes to exactly one (rank, worker) pair per epoch.
    """
    order = epoch_order(shards, epoch=epoch, seed=seed, shuffle=shuffle)
    return worker_split(node_split(order, rank, world_size), worker, num_workers)


def quotas(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder), so quotas sum to exactly `total`."""
    norm = sum(weights)
    if norm == 0:
        return [0] * len(weights)
    base = [total * w // norm for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % norm), i))
    for i in by_remainder[: total - sum(base)]:
        base[i] += 1
    return base
