"""The shard format: `shard-%06d.tar` webdataset tars (per sample `<key>.jpg` or `<key>.png`, and
`<key>.cls`, the label as decimal text) plus `manifest.json` (classes, counts, normalisation statistics,
and each shard's sample count, size and sha256).

Writing (`ShardSink`, `install`), checking (`load_manifest`, `verify`) and reading (`read_shard`,
`read_samples`): a damaged shard is reported naming its file and what is wrong (truncated, with the last
complete sample; a sample without a member; not a tar; altered).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from stages.hashing import sha256_file

FORMAT = "pcpp-webdataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_FIELDS = ("jpg", "png")


class ShardSink:
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
        shard.update(num_samples=self._count, sha256=sha256_file(path), bytes=path.stat().st_size)


def install(tmp: Path, out: Path, manifest: dict) -> None:
    """Move finished shards into `out`, the manifest last, so no manifest ever names partial shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    for shard in manifest["shards"]:
        os.replace(tmp / shard["name"], out / shard["name"])
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp / MANIFEST, out / MANIFEST)


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
    """Re-hash every shard against the manifest; a missing, truncated or altered shard raises ValueError
    naming it (a truncated one with its last complete sample). Returns the manifest."""
    out = Path(out)
    manifest = load_manifest(out)
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.is_file():
            raise ValueError(f"shard {path} listed in {out / MANIFEST} is missing")
        size = path.stat().st_size
        if shard.get("bytes") is not None and size < shard["bytes"]:
            for _ in read_shard(path, shard, check_hash=False):  # raises, naming the last complete sample
                pass
            raise ValueError(f"shard {path} is truncated: {size} bytes, manifest says {shard['bytes']}")
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise ValueError(f"shard {path} is corrupted: sha256 {digest} != manifest {shard['sha256']}")
    return manifest


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


def read_shard(path: Path, expected: dict, check_hash: bool = True) -> Iterator[dict]:
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
        raise _truncated(
            path, f"after its last member, without the end-of-archive marker (byte {size})", sample, last_complete
        )
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
        for s in read_shard(shard_dir / shard["name"], shard):
            field = s["__field__"]
            yield {
                "key": s["__key__"],
                "label": s["__label__"],
                "field": field,
                "data": s[field],
                "shard": s["__shard__"],
            }
