"""Damaged shards: every kind (truncated inside a header, inside a member's data, before the end-of-archive
marker; a sample missing a member; not a tar at all; a damaged header) is reported naming the shard file,
what is wrong and, where it applies, the last complete sample, by every reader (read_samples, the loader,
verify)."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from stages import data
from stages.hashing import sha256_file

pytestmark = pytest.mark.unit

SHARD = "shard-000000.tar"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Two shards of 6 samples (3 classes x 4 PNGs, 8x8)."""
    tmp = tmp_path_factory.mktemp("pristine")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp / "src" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp / "src" / c / f"img{i}.png")
    data.prepare(tmp / "src", tmp / "out", shard_size=6, progress=False)
    return tmp / "out"


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    out = tmp_path / "shards"
    out.mkdir()
    for p in pristine.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _key(member: tarfile.TarInfo) -> str:
    return member.name.split(".", 1)[0]


def _readers(out: Path):
    """Every way a shard gets read; each must raise the same message."""
    yield "read_samples", lambda: list(data.read_samples(out))
    yield "loader", lambda: list(data.make_loader(out, train=False, batch_size=4))
    yield "train loader", lambda: list(data.make_loader(out, train=True, batch_size=4, shuffle_buffer=1))


def _raises_everywhere(out: Path, pattern: str, verify: str | None = None):
    for name, read in _readers(out):
        with pytest.raises(ValueError, match=pattern) as info:
            read()
        assert str(out / SHARD) in str(info.value), name
    with pytest.raises(ValueError, match=verify or pattern):
        data.verify(out)


def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


# (where to cut, as a function of the member list: index of a member and an offset in it) -> last complete
# sample. Member 2k and 2k+1 are sample k's cls and png.
CUTS = {
    "inside the header of a sample's first member": (4, lambda m: m.offset + 100, 1),
    "inside the header of a sample's second member": (5, lambda m: m.offset + 300, 1),
    "inside a member's data": (5, lambda m: m.offset_data + m.size // 2, 1),
    "inside the first member's data": (1, lambda m: m.offset_data + 10, None),
    "between two samples": (6, lambda m: m.offset, 2),
    "between a sample's two members": (7, lambda m: m.offset, 2),
}


@pytest.mark.parametrize("where", sorted(CUTS))
def test_truncated_shard_names_file_and_last_complete_sample(shards, where):
    index, offset, last = CUTS[where]
    path = shards / SHARD
    members = _members(path)
    _cut(path, offset(members[index]))
    expected = "none" if last is None else repr(_key(members[2 * last + 1]))
    _raises_everywhere(shards, rf"{SHARD} is truncated: it ends .*; last complete sample: {expected}")


@pytest.mark.parametrize("keep", [0, 100, 511])
def test_truncated_inside_the_first_header(shards, keep):
    _cut(shards / SHARD, keep)
    _raises_everywhere(shards, rf"{SHARD} is truncated: it ends inside its first header .*last complete sample: none")


def test_truncated_before_the_end_of_archive_marker(shards):
    path = shards / SHARD
    blob = path.read_bytes()
    members = _members(path)
    end = members[-1].offset_data + members[-1].size
    end += -end % tarfile.BLOCKSIZE
    for keep in (end, end + 600):  # no marker, part of it: every sample is there, the file is still cut
        path.write_bytes(blob[:keep])
        _raises_everywhere(
            shards,
            rf"{SHARD} is truncated: it ends after its last member.*last complete sample: {_key(members[-1])!r}",
        )


def _rewrite(out: Path, drop: set[str]) -> list[str]:
    """Write shard 0 again without the members named in `drop`, updating the manifest's hash and size."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [s for s in data.read_samples(out) if s["shard"] == SHARD]
    with wds.TarWriter(str(out / SHARD), encoder=False, mtime=0) as writer:
        for s in samples:
            fields = {"png": s["data"], "cls": str(s["label"]).encode()}
            writer.write({"__key__": s["key"], **{k: v for k, v in fields.items() if f"{s['key']}.{k}" not in drop}})
    entry = manifest["shards"][0]
    entry.update(sha256=sha256_file(out / SHARD), bytes=(out / SHARD).stat().st_size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return [s["key"] for s in samples]


@pytest.mark.parametrize("sample,field", [(2, "png"), (2, "cls"), (0, "png"), (5, "png")])
def test_sample_missing_a_member(shards, sample, field):
    keys = [s["key"] for s in data.read_samples(shards) if s["shard"] == SHARD]
    _rewrite(shards, {f"{keys[sample]}.{field}"})
    before = repr(keys[sample - 1]) if sample else "None"
    pattern = (
        rf"{SHARD}: sample {keys[sample]!r} lacks a member: it has fields \[.*\], expected one of .*; "
        rf"last complete sample before it: {before}"
    )
    for _, read in _readers(shards):
        with pytest.raises(ValueError, match=pattern):
            read()
    data.verify(shards)  # the shard is a well-formed tar whose hash the manifest records: verify passes


@pytest.mark.parametrize("kind", ["random bytes", "gzip of the shard", "text"])
def test_shard_that_is_not_a_tar(shards, kind):
    path = shards / SHARD
    blob = path.read_bytes()
    path.write_bytes(
        {
            "random bytes": np.random.default_rng(0).integers(0, 256, len(blob), dtype=np.uint8).tobytes(),
            "gzip of the shard": gzip.compress(blob),
            "text": b"version https://git-lfs.github.com/spec/v1\n" * 40,
        }[kind]
    )
    for _, read in _readers(shards):
        with pytest.raises(ValueError, match=rf"{SHARD} is not a tar archive"):
            read()
    with pytest.raises(ValueError, match=rf"{SHARD}"):
        data.verify(shards)


def test_damaged_header_inside_a_shard(shards):
    path = shards / SHARD
    members = _members(path)
    blob = bytearray(path.read_bytes())
    blob[members[4].offset + 10] ^= 0xFF  # the header checksum no longer matches
    path.write_bytes(bytes(blob))
    pattern = rf"{SHARD} is corrupt: the block at byte {members[4].offset} is neither a tar header"
    for _, read in _readers(shards):
        with pytest.raises(ValueError, match=pattern + rf".*last complete sample: {_key(members[3])!r}"):
            read()


def test_missing_shard_is_named(shards):
    (shards / SHARD).unlink()
    for _, read in _readers(shards):
        with pytest.raises(ValueError, match=rf"{SHARD} listed in the manifest is missing"):
            read()


def test_intact_shards_still_read(shards):
    assert len(list(data.read_samples(shards))) == 12
    assert sum(len(y) for _, y in data.make_loader(shards, train=False, batch_size=5)) == 12
    data.verify(shards)


def test_in_memory_tar_fixture_is_as_written():
    # guard for the cut positions above: cls then png per sample, each member in one header block
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
        writer.write({"__key__": "a/img0", "png": b"x" * 10, "cls": b"0"})
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        assert [m.name for m in tar.getmembers()] == ["a/img0.cls", "a/img0.png"]
