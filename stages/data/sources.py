"""Image sources for `prepare`: an ImageFolder tree and CIFAR python batches (tar archives: `archive.py`).

A source lists its classes (sorted, as ImageFolder) and its items (sorted by class then path, each with
the sample key it is stored under) and reads one item's raw content.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Item:
    name: str  # what errors and `skipped` report: a path, a tar member name, or `batch[index]`
    key: str
    label: int


class Source:
    """Classes, items sorted in ImageFolder order, and random access to each item's raw content."""

    kind: str
    classes: list[str]
    items: list[Item]

    def read(self, index: int) -> bytes | np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


def is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _key_for(relative: str) -> str:
    # webdataset splits a member name at the first dot of its last component: keep the stem dot-free
    head, _, base = relative.rpartition("/")
    stem = base.rsplit(".", 1)[0].replace(".", "_")
    return f"{head}/{stem}" if head else stem


def make_items(per_class: list[list[tuple[str, str]]]) -> list[Item]:
    """Items from (name, path relative to the ImageFolder root) lists per class, rejecting keys that collide."""
    items, seen = [], {}
    for label, entries in enumerate(per_class):
        for name, relative in sorted(entries, key=lambda e: e[1]):
            key = _key_for(relative)
            if key in seen:
                raise ValueError(f"{name!r} and {seen[key]!r} map to the same sample key {key!r}")
            seen[key] = name
            items.append(Item(name, key, label))
    return items


class FolderSource(Source):
    """root/<class>/.../<image>: the classes are root's sub-directories, images at any depth below them.

    Hidden files and directories are skipped; files directly in root belong to no class.
    """

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
                    if is_image(f):
                        relative = Path(dirpath, f).relative_to(root).as_posix()
                        found.append((relative, relative))
            if not found:
                raise ValueError(f"class directory {cls!r} in {root} holds no images ({', '.join(IMG_EXTENSIONS)})")
            per_class.append(found)
        self.items = make_items(per_class)

    def read(self, index: int) -> bytes:
        return (self.root / self.items[index].name).read_bytes()


class CifarSource(Source):
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
                items.append(Item(f"{f.name}[{i}]", f"{f.name}/{i:05d}", y))
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
