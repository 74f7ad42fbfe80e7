"""The training/evaluation loader over prepared shards: explicit rank and worker split, seeded shuffling
and augmentation (RandomCrop with zero padding + horizontal flip), a fixed number of samples per epoch.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.data.shards import load_manifest, read_shard
from stages.data.splitting import epoch_order, node_split, quotas, seed_of, worker_split

CROP_PADDING = 4


class _ShardStream(IterableDataset):
    """Per worker: its shards, cycled if the epoch needs more, shuffled, decoded and batched."""

    def __init__(
        self,
        shard_dir: Path,
        shards: list[dict],
        *,
        train: bool,
        rank: int,
        world_size: int,
        epoch_length: int,
        seed: int,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        shuffle_buffer: int,
        with_keys: bool,
        check_hash: bool,
    ):
        super().__init__()
        self.shard_dir, self.shards = shard_dir, shards
        self.train, self.rank, self.world_size = train, rank, world_size
        self.epoch_length, self.seed, self.batch_size = epoch_length, seed, batch_size
        # on the 0..255 scale, so a batch is normalised in two in-place passes
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
        self.image_size, self.shuffle_buffer = image_size, shuffle_buffer
        self.with_keys, self.check_hash = with_keys, check_hash
        self.epoch = 0

    def rank_shards(self, epoch: int) -> list[dict]:
        order = epoch_order(self.shards, epoch=epoch, seed=self.seed, shuffle=self.train)
        return node_split(order, self.rank, self.world_size)

    def plan(self, worker: int, num_workers: int) -> tuple[list[dict], int]:
        """(shards to read in order, number of samples to yield) for one worker this epoch."""
        mine = self.rank_shards(self.epoch)
        sizes = [sum(s["num_samples"] for s in worker_split(mine, w, num_workers)) for w in range(num_workers)]
        quota = quotas(self.epoch_length, sizes)[worker]
        own = worker_split(mine, worker, num_workers)
        if quota == 0:
            return [], 0
        plan = list(own)
        for cycle in range(1, math.ceil(quota / sizes[worker])):
            # only when this rank's shards hold fewer samples than the epoch length
            again = list(own)
            if self.train:
                random.Random(seed_of(self.seed, self.epoch, self.rank, worker, cycle)).shuffle(again)
            plan += again
        return plan, quota

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan, quota = self.plan(worker, num_workers)
        if quota == 0:
            return iter(())
        stream_seed = seed_of(self.seed, self.epoch, self.rank, worker, "samples")
        rng = np.random.default_rng(seed_of(self.seed, self.epoch, self.rank, worker, "augment"))
        return iter(
            wds.DataPipeline(
                lambda: iter(plan),  # a bare list would be spliced into the stages
                self._samples,
                wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(stream_seed))
                if self.train
                else None,
                # cut only a partial pass: islice would stop before the last shard's end-of-shard checks
                (lambda src: islice(src, quota)) if quota < sum(s["num_samples"] for s in plan) else None,
                wds.map(lambda s: self._decode(s, rng)),
                wds.batched(self.batch_size, collation_fn=self._collate, partial=True),
            )
        )

    def _samples(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            yield from read_shard(self.shard_dir / shard["name"], shard, self.check_hash)

    def _decode(self, sample: dict, rng: np.random.Generator) -> tuple[np.ndarray, int, str]:
        try:
            with Image.open(io.BytesIO(sample[sample["__field__"]])) as img:
                img = img.convert("RGB")
                if img.size != (self.image_size, self.image_size):
                    img = ImageOps.fit(img, (self.image_size, self.image_size), Image.BILINEAR)
                x = np.asarray(img)
        except Exception as exn:
            raise ValueError(f"shard {sample['__shard__']}: cannot decode key {sample['__key__']!r}: {exn}") from exn
        if self.train:
            x = _random_crop_flip(x, rng)
        return x, sample["__label__"], sample["__key__"]

    def _collate(self, samples: list[tuple[np.ndarray, int, str]]) -> tuple:
        # numpy, not torch: single-threaded, so a loader without workers does not fight for cores
        images = np.ascontiguousarray(np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2), dtype=np.float32)
        images -= self.mean
        images /= self.std
        labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        images = torch.from_numpy(images)
        return (images, labels, [s[2] for s in samples]) if self.with_keys else (images, labels)


def _random_crop_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RandomCrop(size, padding=4) with zero padding, then RandomHorizontalFlip, on an HWC array."""
    h, w, _ = x.shape
    p = CROP_PADDING
    padded = np.pad(x, ((p, p), (p, p), (0, 0)))
    i, j = rng.integers(0, 2 * p + 1, size=2)
    x = padded[i : i + h, j : j + w]
    return x[:, ::-1] if rng.random() < 0.5 else x


def _rebatch(batches: Iterable[tuple], size: int, drop_last: bool) -> Iterator[tuple]:
    """Exact `size` batches from the workers' batches, whose last ones are partial."""
    pending: list[tuple] = []
    held = 0
    for batch in batches:
        n = len(batch[1])
        if not pending and n == size:
            yield batch
            continue
        pending.append(batch)
        held += n
        while held >= size:
            merged = _concat(pending)
            yield tuple(part[:size] for part in merged)
            rest = tuple(part[size:] for part in merged)
            held -= size
            pending = [rest] if held else []
    if held and not drop_last:
        yield _concat(pending)


def _concat(batches: list[tuple]) -> tuple:
    if len(batches) == 1:
        return batches[0]
    return tuple(
        torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [k for p in parts for k in p]
        for parts in zip(*batches)
    )


class ShardLoader:
    """Batches (images NCHW float normalised, labels long[, keys]) of one rank; fixed length per epoch.

    Like DistributedSampler, the order depends on (seed, epoch): call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        stream: _ShardStream,
        manifest: dict,
        *,
        batch_size: int,
        drop_last: bool,
        num_workers: int,
        pin_memory: bool,
    ):
        self._stream, self.manifest = stream, manifest
        self.batch_size, self.drop_last = batch_size, drop_last
        self.num_workers, self.pin_memory = num_workers, pin_memory

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    @property
    def epoch_length(self) -> int:
        """Samples per epoch on this rank."""
        return self._stream.epoch_length

    def set_epoch(self, epoch: int) -> None:
        self._stream.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.epoch_length // self.batch_size
        return math.ceil(self.epoch_length / self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        # workers are started per epoch (not persistent), so they see the current epoch; from a process that
        # holds CUDA (and NCCL) they start from a forkserver: forked from such a process, workers closed early
        # (BatchNorm recalibration's few batches) died with "terminate called without an active exception"
        # (SIGABRT) on an H200 with torch 2.11, 7 of 23 runs (bench/table2_local.py)
        context = "forkserver" if self.num_workers and torch.cuda.is_initialized() else None
        loader = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            multiprocessing_context=context)
        batches = iter(loader)
        try:
            yield from _rebatch(batches, self.batch_size, self.drop_last)
        finally:
            # stop workers now on an error or early break: a worker error's traceback keeps the iterator
            # alive, and torch's shutdown from the garbage collector waits 5 s per worker
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are made, whatever the shards and the rank: one value a caller builds once.

    batch_size: samples per batch (per rank); num_workers: DataLoader worker processes; mean/std: the
    per-channel normalisation (3 values each; None: the manifest's); image_size: the training crop's side
    in pixels; drop_last: None means True for training, False for evaluation; shuffle_buffer: samples in
    the seeded shuffle buffer; with_keys: batches carry their sample keys as a third element; pin_memory:
    DataLoader's; check_hash: verify each fully read shard's sha256.
    """

    batch_size: int = 128
    num_workers: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: int = 32
    drop_last: bool | None = None
    shuffle_buffer: int = 2000
    with_keys: bool = False
    pin_memory: bool = False
    check_hash: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {self.num_workers}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(float(v) for v in value))


def make_loader(
    shard_dir: str | os.PathLike,
    config: LoaderConfig | None = None,
    *,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    epoch_length: int | None = None,
    **fields,
) -> ShardLoader:
    """A loader over the shards in `shard_dir` for one rank.

    Train: shards permuted per (seed, epoch), split by rank then by worker, samples shuffled in a
    seeded buffer, RandomCrop(image_size, padding=4) + horizontal flip; `epoch_length` (samples per
    rank, default num_samples // world_size) is met by cycling or truncating the rank's shards, and
    drop_last defaults to True. Eval: fixed split, no shuffling or augmentation, default length the
    rank's own shards, drop_last False. mean/std default to the manifest's. `with_keys` adds each
    batch's sample keys as a third element. `check_hash` checks each fully read shard's sha256.

    config: how batches are made (`LoaderConfig`); keyword `fields` (any of its field names, e.g.
    batch_size=64) replace its values for this call. seed, rank, world_size, epoch and epoch_length say
    which samples this rank reads. Raises ValueError for an unknown field or a split that cannot be made.
    """
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LoaderConfig)})
    if unknown:
        raise TypeError(f"make_loader got unknown loader fields {unknown}; valid: "
                        f"{', '.join(f.name for f in dataclasses.fields(LoaderConfig))}")
    c = dataclasses.replace(config or LoaderConfig(), **fields)
    batch_size, num_workers, mean, std = c.batch_size, c.num_workers, c.mean, c.std
    image_size, drop_last, shuffle_buffer, with_keys = c.image_size, c.drop_last, c.shuffle_buffer, c.with_keys
    pin_memory, check_hash = c.pin_memory, c.check_hash
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    shards = manifest["shards"]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if len(shards) < world_size:
        raise ValueError(
            f"{len(shards)} shards in {shard_dir} cannot be split over {world_size} ranks: "
            "prepare with a smaller shard_size"
        )
    if num_workers and len(shards) < world_size * num_workers:
        warnings.warn(
            f"{len(shards)} shards for {world_size} ranks x {num_workers} workers: some workers stay idle",
            stacklevel=2,
        )
    mean = manifest["mean"] if mean is None else list(mean)
    std = manifest["std"] if std is None else list(std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channels, got {mean} and {std}")
    if epoch_length is None:
        if train:
            epoch_length = manifest["num_samples"] // world_size
        else:
            epoch_length = sum(s["num_samples"] for s in node_split(shards, rank, world_size))
    if epoch_length < 1:
        raise ValueError(f"epoch_length must be positive, not {epoch_length}")
    stream = _ShardStream(
        shard_dir,
        shards,
        train=train,
        rank=rank,
        world_size=world_size,
        epoch_length=epoch_length,
        seed=seed,
        batch_size=batch_size,
        mean=mean,
        std=std,
        image_size=image_size,
        shuffle_buffer=shuffle_buffer,
        with_keys=with_keys,
        check_hash=check_hash,
    )
    stream.epoch = epoch
    return ShardLoader(
        stream,
        manifest,
        batch_size=batch_size,
        drop_last=train if drop_last is None else drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def eval_loader(shard_dir: str | os.PathLike, model_name: str, *, limit: int | None = None,
                batch_size: int = 256) -> ShardLoader:
    """The evaluation loader of a test shard directory, normalised with the statistics the model `model_name`
    was trained with (pcpp.models.normalization): the first `limit` samples (all by default), in order."""
    from pcpp import models

    norm = models.normalization(model_name)
    return make_loader(shard_dir, LoaderConfig(batch_size=batch_size, mean=norm.mean, std=norm.std), train=False,
                       epoch_length=limit)
