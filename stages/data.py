"""Data stage: image sources to webdataset shards, and a deterministic sharded loader.

`prepare` turns an ImageFolder tree, a tar of one, or a CIFAR python-batch directory into
`shard-%06d.tar` files (fields `jpg` or `png`, and `cls`) plus a `manifest.json`; `verify` re-hashes the
shards; `make_loader` reads them split explicitly by rank and by DataLoader worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import pickle
import random
import re
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

FORMAT = "pcpp-webdataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_FIELDS = ("jpg", "png")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CROP_PADDING = 4

__all__ = [
    "ShardLoader",
    "assign_shards",
    "load_manifest",
    "make_loader",
    "node_split",
    "prepare",
    "read_samples",
    "verify",
    "worker_split",
]


# --------------------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class _Item:
    name: str  # what errors and `skipped` report: a path, a tar member name, or `batch[index]`
    key: str
    label: int


class _Source:
    """Classes, items sorted in ImageFolder order, and random access to each item's raw content."""

    kind: str
    classes: list[str]
    items: list[_Item]

    def read(self, index: int) -> bytes | np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _key_for(relative: str) -> str:
    # webdataset splits a member name at the first dot of its last component: keep the stem dot-free
    head, _, base = relative.rpartition("/")
    stem = base.rsplit(".", 1)[0].replace(".", "_")
    return f"{head}/{stem}" if head else stem


def _items(per_class: list[list[tuple[str, str]]]) -> list[_Item]:
    """Items from (name, relative path) lists per class, rejecting keys that collide."""
    items, seen = [], {}
    for label, entries in enumerate(per_class):
        for name, relative in sorted(entries, key=lambda e: e[1]):
            key = _key_for(relative)
            if key in seen:
                raise ValueError(f"{name!r} and {seen[key]!r} map to the same sample key {key!r}")
            seen[key] = name
            items.append(_Item(name, key, label))
    return items


class _FolderSource(_Source):
    kind = "imagefolder"

    def __init__(self, root: Path):
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"no class directories in ImageFolder {root} (expected root/<class>/<image>)")
        per_class = []
        for cls in self.classes:
            found = []
            for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for f in filenames:
                    if _is_image(f):
                        relative = Path(dirpath, f).relative_to(root).as_posix()
                        found.append((relative, relative))
            if not found:
                raise ValueError(f"class directory {cls!r} in {root} holds no images ({', '.join(IMG_EXTENSIONS)})")
            per_class.append(found)
        self.items = _items(per_class)

    def read(self, index: int) -> bytes:
        return (self.root / self.items[index].name).read_bytes()


def _normalise_member(name: str) -> str | None:
    """A tar member name as a relative POSIX path ("./a//b" -> "a/b"), None for hidden or escaping ones."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") for p in parts):
        return None  # hidden entries (and "..") are skipped, as the folder walk skips hidden directories
    return "/".join(parts)


class _TarSource(_Source):
    """An ImageFolder tree inside a tar archive (plain, .gz, .bz2 or .xz), read in one streaming pass.

    The image members are copied, in archive order, into an uncompressed scratch file, so reading them
    later in shuffled order never seeks back into a compressed stream (a gzip stream has no random
    access: each backward seek decompresses again from the start).

    Where the classes are, for every archive whatever its packing (`tar -C root .`, `./` prefixes, a
    wrapping directory like `train/<class>/...`):
    - names are normalised (leading `/` and `./` dropped) and hidden entries skipped, as in a folder;
    - the ImageFolder root is the deepest directory that holds every image, so wrapping directories
      are unwrapped whatever their depth;
    - the classes are the root's sub-directories, and an image anywhere below a class directory belongs
      to that class (`cats/kaggle/b.png` is a cat), as in a folder;
    - images directly in the root: at the archive's top they belong to no class and are left out (as a
      folder's files beside its class directories); a directory that holds only images is the one class
      of a single-class archive; a directory that holds both images and image sub-directories is
      refused, since it reads either as a root with stray files or as one class with nested folders.
    """

    kind = "tar"

    def __init__(self, path: Path, scratch: Path | None = None, progress: bool = False):
        self.path = path
        self._spool = tempfile.TemporaryFile(dir=scratch)
        try:
            found = self._stream_images(path, progress)
            root = self._root(path, list(found))
        except BaseException:
            self._spool.close()
            raise
        strip = len(root) + 1 if root else 0
        per_class: dict[str, list[tuple[str, str]]] = {}
        for relative, (member, _, _) in found.items():
            if root and not relative.startswith(root + "/"):
                continue
            inside = relative[strip:]
            if "/" in inside:
                per_class.setdefault(inside.split("/", 1)[0], []).append((member, inside))
        if not per_class:
            raise ValueError(f"tar {path} has no images in class directories (expected [<root>/]<class>/<image>)")
        self.classes = sorted(per_class)
        self.items = _items([per_class[c] for c in self.classes])
        self._where = {member: (offset, size) for member, offset, size in found.values()}

    def _stream_images(self, path: Path, progress: bool) -> dict[str, tuple[str, int, int]]:
        """{normalised name: (member name, offset, size)} of the image members, spooled in one pass."""
        found: dict[str, tuple[str, int, int]] = {}
        last = None
        try:
            # "r|*": a forward-only stream of any compression tarfile knows
            with tarfile.open(path, mode="r|*") as tar:
                for member in tqdm(tar, desc=f"read {path.name}", unit="file", disable=not progress):
                    tar.members = []  # stream mode keeps every header otherwise (webdataset does the same)
                    last = member.name
                    relative = _normalise_member(member.name)
                    if relative is None or not _is_image(relative):
                        continue
                    if member.islnk():
                        target = _normalise_member(member.linkname)
                        if target in found:  # a hard link shares its target's content
                            found[relative] = (member.name, *found[target][1:])
                        continue
                    if not member.isreg():
                        continue
                    offset = self._spool.seek(0, os.SEEK_END)
                    shutil.copyfileobj(tar.extractfile(member), self._spool, 1 << 20)
                    # a name stored twice is extracted as its last copy: keep that one
                    found[relative] = (member.name, offset, member.size)
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exn:
            where = f" after member {last!r}" if last else ""
            raise ValueError(f"cannot read tar {path}{where}: {exn}") from exn
        if not found:
            raise ValueError(f"no images in tar {path} ({', '.join(IMG_EXTENSIONS)})")
        return found

    @staticmethod
    def _root(path: Path, names: list[str]) -> str:
        """The ImageFolder root inside the archive ("" for its top), by the rule in the class docstring."""
        dirs = [n.split("/")[:-1] for n in names]
        common = dirs[0]
        for d in dirs[1:]:
            n = 0
            while n < min(len(common), len(d)) and common[n] == d[n]:
                n += 1
            common = common[:n]
        depth = len(common)
        direct = [n for n, d in zip(names, dirs) if len(d) == depth]
        if not direct or depth == 0:
            return "/".join(common)
        nested = sorted({d[depth] for d in dirs if len(d) > depth})
        if not nested:
            return "/".join(common[:-1])  # a single-class archive: the directory is the class
        top = "/".join(common)
        raise ValueError(
            f"tar {path}: {top!r} holds images directly ({direct[0]!r}) and in sub-directories "
            f"({', '.join(nested[:5])}): it is either an ImageFolder root with stray files or one class with "
            f"nested folders; archive the tree as root/<class>/.../<image> without images beside the classes"
        )

    def read(self, index: int) -> bytes:
        offset, size = self._where[self.items[index].name]
        self._spool.seek(offset)
        return self._spool.read(size)

    def close(self) -> None:
        self._spool.close()


class _CifarSource(_Source):
    """CIFAR-10 (`data_batch_*`, `test_batch`, `batches.meta`) or CIFAR-100 (`train`, `test`, `meta`)."""

    kind = "cifar-python"

    def __init__(self, root: Path, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' for CIFAR batches, not {split!r}")
        if (root / "batches.meta").is_file():
            meta, names_key, labels_key = root / "batches.meta", b"label_names", b"labels"
            files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        else:
            meta, names_key, labels_key = root / "meta", b"fine_label_names", b"fine_labels"
            files = [root / split]
        files = [f for f in files if f.is_file()]
        if not files:
            raise ValueError(f"no CIFAR {split} batches in {root}")
        names = [n.decode() for n in self._unpickle(meta).get(names_key, [])]
        if not names:
            raise ValueError(f"{meta} lists no classes")
        self.classes = sorted(names)
        # CIFAR orders its label names its own way; relabel to sorted (ImageFolder) order
        relabel = [self.classes.index(n) for n in names]
        items, refs = [], []
        for f in files:
            batch = self._unpickle(f)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                labels = [relabel[int(y)] for y in batch[labels_key]]
            except (KeyError, ValueError, IndexError) as exn:
                raise ValueError(f"malformed CIFAR batch {f}: {exn!r}") from exn
            if len(labels) != len(data):
                raise ValueError(f"malformed CIFAR batch {f}: {len(data)} images, {len(labels)} labels")
            for i, y in enumerate(labels):
                items.append(_Item(f"{f.name}[{i}]", f"{f.name}/{i:05d}", y))
                refs.append((data, i))
        order = sorted(range(len(items)), key=lambda i: (items[i].label, items[i].key))
        self.items = [items[i] for i in order]
        self._refs = [refs[i] for i in order]

    @staticmethod
    def _unpickle(path: Path) -> dict:
        # CIFAR batches are pickles by definition: only point this at files you trust
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except (OSError, pickle.UnpicklingError, EOFError) as exn:
            raise ValueError(f"cannot read CIFAR file {path}: {exn}") from exn

    def read(self, index: int) -> np.ndarray:
        data, i = self._refs[index]
        return data[i]


def _open_source(src: Path, split: str, scratch: Path | None = None, progress: bool = False) -> _Source:
    if not src.exists():
        raise FileNotFoundError(f"data source {src} does not exist")
    if src.is_dir():
        if (src / "batches.meta").is_file() or (src / "meta").is_file():
            return _CifarSource(src, split)
        return _FolderSource(src)
    if tarfile.is_tarfile(src):
        return _TarSource(src, scratch, progress)
    raise ValueError(f"{src} is neither a directory (ImageFolder or CIFAR batches) nor a tar archive")


# --------------------------------------------------------------------------------------------------------
# prepare / verify


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _ShardSink:
    """Writes samples into numbered shards of `shard_size` samples in `directory`."""

    def __init__(self, directory: Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.shards: list[dict] = []
        self._file = self._writer = None
        self._count = 0

    def write(self, key: str, field: str, data: bytes, label: int) -> None:
        if self._writer is None:
            name = SHARD_PATTERN % len(self.shards)
            self._file = open(self.directory / name, "wb")
            # a fixed mtime makes shards, and so their hashes, reproducible
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=0)
            self.shards.append({"name": name})
            self._count = 0
        self._writer.write({"__key__": key, field: data, "cls": str(label).encode()})
        self._count += 1
        if self._count == self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self._writer = self._file = None
        shard = self.shards[-1]
        path = self.directory / shard["name"]
        shard.update(num_samples=self._count, sha256=_sha256(path), bytes=path.stat().st_size)


def _install(tmp: Path, out: Path, manifest: dict) -> None:
    """Move finished shards into `out`, the manifest last, so no manifest ever names partial shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    for shard in manifest["shards"]:
        os.replace(tmp / shard["name"], out / shard["name"])
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp / MANIFEST, out / MANIFEST)


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
        source = _open_source(src, split, scratch=tmp, progress=progress)
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
            split=split if source.kind == _CifarSource.kind else None,
            shuffle_seed=shuffle_seed,
            limit_per_class=limit_per_class,
        )
        _install(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_shards(
    source: _Source, selected: list[int], src: Path, tmp: Path, shard_size: int, skip_corrupt: bool, progress: bool
) -> dict:
    """Encode the selected items in order into shards under `tmp`; the manifest without its source fields."""
    sink = _ShardSink(tmp, shard_size)
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


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest written by `prepare`, checked for format and version."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stages.data.prepare first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def verify(out: str | os.PathLike) -> dict:
    """Re-hash every shard against the manifest; a missing or altered shard raises ValueError naming it."""
    out = Path(out)
    manifest = load_manifest(out)
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.is_file():
            raise ValueError(f"shard {shard['name']} listed in {out / MANIFEST} is missing")
        size = path.stat().st_size
        if shard.get("bytes") is not None and size < shard["bytes"]:
            for _ in _read_shard(path, shard, check_hash=False):  # raises, naming the last complete sample
                pass
            raise ValueError(f"shard {path} is truncated: {size} bytes, manifest says {shard['bytes']}")
        digest = _sha256(path)
        if digest != shard["sha256"]:
            raise ValueError(f"shard {shard['name']} is corrupted: sha256 {digest} != manifest {shard['sha256']}")
    return manifest


# --------------------------------------------------------------------------------------------------------
# reading shards


class _HashingReader:
    """File wrapper that hashes what tarfile reads, so a shard is checked in the same single pass."""

    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key.field, as webdataset splits names


def _read_shard(path: Path, expected: dict, check_hash: bool = True) -> Iterator[dict]:
    """Samples of one shard (`__key__`, `__shard__`, fields), checked against its manifest entry.

    A damaged shard raises ValueError naming its file and what is wrong: truncated (inside a member's
    data, inside a header, or before the end-of-archive marker, with the last complete sample), a
    sample that lacks a member, not a tar at all, or altered (sha256).
    """
    name = path.name
    if not path.is_file():
        raise ValueError(f"shard {path} listed in the manifest is missing")
    size = path.stat().st_size
    count, sample, member, last_complete = 0, None, None, None
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            tar = tarfile.open(fileobj=reader, mode="r|")
        except tarfile.TarError as exn:
            raise _not_a_tar(path, size, expected, exn) from exn
        try:
            with tar:
                for member in tar:
                    tar.members = []  # stream mode keeps every header otherwise
                    if not member.isreg():
                        continue
                    match = _MEMBER.match(member.name)
                    if match is None:
                        raise ValueError(f"shard {path}: member {member.name!r} is not key.field")
                    key, field = match.group(1), match.group(2).lower()
                    data = tar.extractfile(member).read()
                    if sample is not None and sample["__key__"] != key:
                        yield _checked(sample, path, last_complete)
                        count += 1
                        last_complete, sample = sample["__key__"], None
                    if sample is None:
                        sample = {"__key__": key, "__shard__": name}
                    if field in sample:
                        raise ValueError(f"shard {path}: key {key!r} has field {field!r} twice")
                    sample[field] = data
                end = tar.offset  # where the end-of-archive marker should start
        except (tarfile.TarError, OSError, EOFError) as exn:
            if member is not None and member.offset_data + member.size > size:
                raise _truncated(path, f"inside the data of member {member.name!r}", sample, last_complete) from exn
            raise ValueError(
                f"shard {path} is corrupt after member {getattr(member, 'name', None)!r}: {exn}; "
                f"last complete sample: {_complete(sample, last_complete)!r}"
            ) from exn
        digest = reader.drain()  # before any seek: the hash covers the file in order
        _check_end(path, f, end, size, sample, last_complete)
    if sample is not None:
        yield _checked(sample, path, last_complete)
        count += 1
    if count != expected["num_samples"]:
        raise ValueError(f"shard {path}: read {count} samples, manifest says {expected['num_samples']}")
    if check_hash and digest != expected["sha256"]:
        raise ValueError(f"shard {path}: sha256 {digest} != manifest {expected['sha256']} (altered shard)")


def _complete(sample: dict | None, last_complete: str | None) -> str | None:
    """The last complete sample: the one being read if it has all its fields, else the one before."""
    if sample is not None and "cls" in sample and sum(f in sample for f in IMAGE_FIELDS) == 1:
        return sample["__key__"]
    return last_complete


def _truncated(path: Path, where: str, sample: dict | None, last_complete: str | None) -> ValueError:
    last = _complete(sample, last_complete)
    return ValueError(
        f"shard {path} is truncated: it ends {where}; last complete sample: "
        + (repr(last) if last is not None else "none")
        + " (prepare the data again, or copy the shard again)"
    )


def _check_end(path: Path, f, end: int, size: int, sample: dict | None, last_complete: str | None) -> None:
    """After tarfile stopped at byte `end`: the rest must start with the end-of-archive marker.

    In stream mode tarfile stops silently at a truncated or damaged header past the first one, so that
    is told apart here, before the last pending sample would be judged to lack a member.
    """
    block = tarfile.BLOCKSIZE
    f.seek(end)
    tail = f.read(2 * block)
    head = tail[:block]
    if len(tail) == 2 * block and not tail.strip(b"\0"):
        return
    if head.strip(b"\0") and len(head) < block:
        raise _truncated(path, f"inside a member header (bytes {end}..{size})", sample, last_complete)
    if not head.strip(b"\0") and len(tail) < 2 * block:
        raise _truncated(path, f"after its last member, without the end-of-archive marker (byte {size})", sample,
                         last_complete)
    raise ValueError(
        f"shard {path} is corrupt: the block at byte {end} is neither a tar header nor the end-of-archive "
        f"marker; last complete sample: {_complete(sample, last_complete)!r}"
    )


def _not_a_tar(path: Path, size: int, expected: dict, exn: Exception) -> ValueError:
    if size < tarfile.BLOCKSIZE and size < (expected.get("bytes") or tarfile.BLOCKSIZE):
        return _truncated(path, f"inside its first header ({size} bytes, less than one tar header)", None, None)
    return ValueError(f"shard {path} is not a tar archive ({exn}): prepare the data again")


def _checked(sample: dict, path: Path, last_complete: str | None) -> dict:
    fields = [f for f in IMAGE_FIELDS if f in sample]
    if len(fields) != 1 or "cls" not in sample:
        raise ValueError(
            f"shard {path}: sample {sample['__key__']!r} lacks a member: it has fields "
            f"{sorted(k for k in sample if not k.startswith('__'))}, expected one of {IMAGE_FIELDS} and cls; "
            f"last complete sample before it: {last_complete!r}"
        )
    try:
        sample["__label__"] = int(sample["cls"])
    except ValueError as exn:
        raise ValueError(f"shard {path}: key {sample['__key__']!r} has bad cls: {exn}") from exn
    sample["__field__"] = fields[0]
    return sample


def read_samples(shard_dir: str | os.PathLike) -> Iterator[dict]:
    """Every stored sample in shard order: dicts with key, label, field, data (the stored bytes), shard."""
    shard_dir = Path(shard_dir)
    for shard in load_manifest(shard_dir)["shards"]:
        for s in _read_shard(shard_dir / shard["name"], shard):
            field = s["__field__"]
            yield {
                "key": s["__key__"],
                "label": s["__label__"],
                "field": field,
                "data": s[field],
                "shard": s["__shard__"],
            }


# --------------------------------------------------------------------------------------------------------
# splitting


def node_split(shards: Sequence, rank: int, world_size: int) -> list:
    """The shards of `rank`: every world_size-th one, starting at rank."""
    return list(shards[rank::world_size])


def worker_split(shards: Sequence, worker: int, num_workers: int) -> list:
    """The shards of DataLoader `worker` among a rank's shards."""
    return list(shards[worker::num_workers])


def _seed(*parts) -> int:
    # stable across processes and Python runs, unlike hash()
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _epoch_order(shards: Sequence, *, epoch: int, seed: int, shuffle: bool) -> list:
    order = list(shards)
    if shuffle:
        random.Random(_seed(seed, epoch, "shards")).shuffle(order)
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
    order = _epoch_order(shards, epoch=epoch, seed=seed, shuffle=shuffle)
    return worker_split(node_split(order, rank, world_size), worker, num_workers)


def _quotas(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder), so quotas sum to exactly `total`."""
    norm = sum(weights)
    if norm == 0:
        return [0] * len(weights)
    base = [total * w // norm for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % norm), i))
    for i in by_remainder[: total - sum(base)]:
        base[i] += 1
    return base


# --------------------------------------------------------------------------------------------------------
# loader


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
        order = _epoch_order(self.shards, epoch=epoch, seed=self.seed, shuffle=self.train)
        return node_split(order, self.rank, self.world_size)

    def plan(self, worker: int, num_workers: int) -> tuple[list[dict], int]:
        """(shards to read in order, number of samples to yield) for one worker this epoch."""
        mine = self.rank_shards(self.epoch)
        sizes = [sum(s["num_samples"] for s in worker_split(mine, w, num_workers)) for w in range(num_workers)]
        quota = _quotas(self.epoch_length, sizes)[worker]
        own = worker_split(mine, worker, num_workers)
        if quota == 0:
            return [], 0
        plan = list(own)
        for cycle in range(1, math.ceil(quota / sizes[worker])):
            # only when this rank's shards hold fewer samples than the epoch length
            again = list(own)
            if self.train:
                random.Random(_seed(self.seed, self.epoch, self.rank, worker, cycle)).shuffle(again)
            plan += again
        return plan, quota

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan, quota = self.plan(worker, num_workers)
        if quota == 0:
            return iter(())
        stream_seed = _seed(self.seed, self.epoch, self.rank, worker, "samples")
        rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, worker, "augment"))
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
            yield from _read_shard(self.shard_dir / shard["name"], shard, self.check_hash)

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
        # workers are started per epoch (not persistent), so they see the current epoch
        loader = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        batches = iter(loader)
        try:
            yield from _rebatch(batches, self.batch_size, self.drop_last)
        finally:
            # stop workers now on an error or early break: a worker error's traceback keeps the iterator
            # alive, and torch's shutdown from the garbage collector waits 5 s per worker
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_loader(
    shard_dir: str | os.PathLike,
    *,
    train: bool,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    epoch_length: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int = 32,
    drop_last: bool | None = None,
    shuffle_buffer: int = 2000,
    with_keys: bool = False,
    pin_memory: bool = False,
    check_hash: bool = True,
) -> ShardLoader:
    """A loader over the shards in `shard_dir` for one rank.

    Train: shards permuted per (seed, epoch), split by rank then by worker, samples shuffled in a
    seeded buffer, RandomCrop(image_size, padding=4) + horizontal flip; `epoch_length` (samples per
    rank, default num_samples // world_size) is met by cycling or truncating the rank's shards, and
    drop_last defaults to True. Eval: fixed split, no shuffling or augmentation, default length the
    rank's own shards, drop_last False. mean/std default to the manifest's. `with_keys` adds each
    batch's sample keys as a third element. `check_hash` checks each fully read shard's sha256.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    shards = manifest["shards"]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
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


def run(cfg: dict, inputs: dict, out: Path, ctx) -> dict:
    """Data stage: shards for `train/` and `test/` from the configured sources (shard dirs are copied as is)."""
    from cluster.local import resolve

    metrics = {}
    for split in ("train", "test"):
        src = resolve(cfg[split])
        if (src / MANIFEST).exists():
            verify(src)
            shutil.copytree(src, out / split)
            manifest = load_manifest(out / split)
        else:
            manifest = prepare(src, out / split, shard_size=cfg.get("shard_size", 1000), progress=True,
                               split=split)
        metrics[f"{split}_samples"] = manifest["num_samples"]
        metrics["classes"] = len(manifest["classes"])
    return metrics
