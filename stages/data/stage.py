"""The data stage: `prepare` (an image source to shards plus manifest) and `run` (the pipeline's stage)."""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.data.archive import TarSource
from stages.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardSink, install, load_manifest, verify
from stages.data.sources import CifarSource, FolderSource, Source
from stages.schema import PATH


@dataclass
class DataStageConfig:
    """The data stage's config: the two image sources and the shard size."""

    train: str = field(default="", metadata=PATH)  # an ImageFolder tree, a tar of one, CIFAR batches, or shards
    test: str = field(default="", metadata=PATH)
    shard_size: int = 1000  # images per shard

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"data.shard_size must be >= 1, got {self.shard_size}")


def open_source(src: Path, split: str, scratch: Path | None = None, progress: bool = False) -> Source:
    """The source for `src`: CIFAR batches, an ImageFolder tree, or a tar of one (`scratch` holds a
    compressed archive's uncompressed copy while it is read)."""
    if not src.exists():
        raise FileNotFoundError(f"data source {src} does not exist")
    if src.is_dir():
        if (src / "batches.meta").is_file() or (src / "meta").is_file():
            return CifarSource(src, split)
        return FolderSource(src)
    if tarfile.is_tarfile(src):
        return TarSource(src, scratch, progress)
    raise ValueError(f"{src} is neither a directory (ImageFolder or CIFAR batches) nor a tar archive")


def _encode(raw: bytes | np.ndarray) -> tuple[str, bytes, np.ndarray]:
    """(field, bytes to store, RGB pixels); decodes the image fully, so a broken one raises here."""
    if isinstance(raw, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format="PNG")
        return "png", buf.getvalue(), raw
    with Image.open(io.BytesIO(raw)) as img:
        fmt = img.format
        rgb = np.asarray(img.convert("RGB"))
    if fmt == "JPEG":
        return "jpg", raw, rgb
    if fmt == "PNG":
        return "png", raw, rgb
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")  # lossless for everything else
    return "png", buf.getvalue(), rgb


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 5000,
    skip_corrupt: bool = False,
    progress: bool = True,
    limit_per_class: int | None = None,
    split: str = "train",
    shuffle_seed: int | None = 0,
) -> dict:
    """Write `src` as webdataset shards plus `manifest.json` into `out`; returns the manifest.

    `src` is an ImageFolder tree, a tar of one, or a CIFAR python-batch directory (`split` picks its
    train or test batches). JPEG and PNG bytes are stored unchanged, CIFAR arrays and other formats as
    PNG. Samples are written in a seeded random order (`shuffle_seed=None` keeps source order) so each
    shard mixes classes. Every image is decoded once: a broken one raises ValueError naming it, or with
    `skip_corrupt` is left out and listed under `skipped`. `limit_per_class` keeps the first n images
    of each class (sorted by name).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, not {shard_size}")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be positive, not {limit_per_class}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"data source {src} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    # shards are written here and moved into `out` once all are complete; an archive's scratch copy too
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        source = open_source(src, split, scratch=tmp, progress=progress)
        try:
            selected = list(range(len(source.items)))
            if limit_per_class is not None:
                taken = [0] * len(source.classes)
                selected = [i for i in selected if _take(taken, source.items[i].label, limit_per_class)]
            if shuffle_seed is not None:
                random.Random(shuffle_seed).shuffle(selected)
            manifest = _write_shards(source, selected, src, tmp, shard_size, skip_corrupt, progress)
        finally:
            source.close()
        manifest.update(
            source=str(src.resolve()),
            split=split if source.kind == CifarSource.kind else None,
            shuffle_seed=shuffle_seed,
            limit_per_class=limit_per_class,
        )
        install(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_shards(
    source: Source, selected: list[int], src: Path, tmp: Path, shard_size: int, skip_corrupt: bool, progress: bool
) -> dict:
    """Encode the selected items in order into shards under `tmp`; the manifest without its source fields."""
    sink = ShardSink(tmp, shard_size)
    counts = [0] * len(source.classes)
    total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
    sizes: set[tuple[int, int]] = set()
    skipped = []
    for index in tqdm(selected, desc=f"prepare {src.name}", unit="img", disable=not progress):
        item = source.items[index]
        try:
            field, data, rgb = _encode(source.read(index))
        except Exception as exn:
            if not skip_corrupt:
                raise ValueError(f"cannot decode image {item.name!r} in {src}: {exn}") from exn
            skipped.append(item.name)
            continue
        sink.write(item.key, field, data, item.label)
        counts[item.label] += 1
        x = rgb.reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        pixels += len(x)
        sizes.add(rgb.shape[:2])
    sink.finish()
    num_samples = sum(counts)
    if num_samples == 0:
        raise ValueError(f"no decodable images in {src} ({len(skipped)} skipped)")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean * mean, 0.0))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": None,
        "source_kind": source.kind,
        "split": None,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "num_samples": num_samples,
        "class_counts": dict(zip(source.classes, counts)),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "shard_size": shard_size,
        "shuffle_seed": None,
        "limit_per_class": None,
        "shards": sink.shards,
        "num_skipped": len(skipped),
        "skipped": skipped,
    }


def _take(taken: list[int], label: int, limit: int) -> bool:
    taken[label] += 1
    return taken[label] <= limit


def run(cfg: DataStageConfig, inputs: dict, out: Path, ctx) -> dict:
    """Data stage: shards for `train/` and `test/` from the configured sources (shard dirs are copied as is)."""
    from cluster.local import resolve

    metrics = {}
    for split in ("train", "test"):
        src = resolve(getattr(cfg, split))
        if (src / MANIFEST).exists():
            verify(src)
            shutil.copytree(src, out / split)
            manifest = load_manifest(out / split)
        else:
            manifest = prepare(src, out / split, shard_size=cfg.shard_size, progress=True, split=split)
        metrics[f"{split}_samples"] = manifest["num_samples"]
        metrics["classes"] = len(manifest["classes"])
    return metrics
