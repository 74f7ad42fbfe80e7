"""Data sources: an ImageFolder tree gives the same classes, labels and shards however it is packed
(folder, tar, tar.gz/bz2/xz, `./` members, wrapping directories, nested class sub-folders), and an archive
is read in one streaming pass whatever its compression."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import data

pytestmark = pytest.mark.unit

# class directories with images at several depths, plus entries a folder walk skips
TREE = {
    "birds/x/y/z.png": "birds",
    "birds/b0.jpg": "birds",
    "cats/a.png": "cats",
    "cats/kaggle/b.png": "cats",
    "cats/kaggle/c.jpg": "cats",
    "dogs/show/e.png": "dogs",
    "dogs/show/2019/f.png": "dogs",
}
SKIPPED = ["cats/.DS_Store", "cats/._a.png", "cats/readme.txt", "dogs/.cache/g.png"]
CLASSES = ["birds", "cats", "dogs"]


def _image(name: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buf.getvalue()


def _files(tree: dict[str, str] = TREE, skipped: list[str] = SKIPPED) -> dict[str, bytes]:
    files = {name: _image(name, i) for i, name in enumerate(sorted(tree))}
    files.update({name: b"not an image" for name in skipped})
    return files


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


def _write_tar(path: Path, files: dict[str, bytes], prefix: str = "", mode: str = "w", dirs: bool = False) -> Path:
    """A tar of `files` with member names `prefix + name`, optionally with directory entries first."""
    with tarfile.open(path, mode) as tar:
        if dirs:
            seen = set()
            for name in sorted(files):
                parts = name.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d not in seen:
                        seen.add(d)
                        info = tarfile.TarInfo(prefix + d)
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
        for name in sorted(files, reverse=True):  # archive order must not matter
            info = tarfile.TarInfo(prefix + name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return path


PACKINGS = {
    # name: (suffix, member prefix, tarfile mode, directory entries)
    "tar": (".tar", "", "w", False),
    "tar ./ members": (".tar", "./", "w", True),
    "tar wrapped train/": (".tar", "train/", "w", True),
    "tar wrapped ./data/cifar/": (".tar", "./data/cifar/", "w", False),
    "tar /absolute": (".tar", "/", "w", False),
    "tar.gz": (".tar.gz", "", "w:gz", False),
    "tar.gz ./ members": (".tar.gz", "./", "w:gz", True),
    "tar.gz wrapped train/": (".tar.gz", "train/", "w:gz", False),
    "tar.bz2": (".tar.bz2", "", "w:bz2", False),
    "tar.xz wrapped": (".tar.xz", "x/", "w:xz", True),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The folder's manifest and samples: what every packing must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    root = _write_folder(tmp / "tree", _files())
    manifest = data.prepare(root, tmp / "out", shard_size=3, progress=False)
    return manifest, {s["key"]: (s["label"], s["data"]) for s in data.read_samples(tmp / "out")}


def test_folder_reads_nested_class_subfolders(reference):
    manifest, samples = reference
    assert manifest["classes"] == CLASSES
    assert manifest["class_counts"] == {"birds": 2, "cats": 3, "dogs": 2}
    files = _files()
    for name, cls in TREE.items():
        key = name.rsplit(".", 1)[0]
        assert samples[key] == (CLASSES.index(cls), files[name])


@pytest.mark.parametrize("packing", sorted(PACKINGS))
def test_every_packing_gives_the_folders_classes_labels_and_shards(packing, reference, tmp_path):
    suffix, prefix, mode, dirs = PACKINGS[packing]
    archive = _write_tar(tmp_path / f"src{suffix}", _files(), prefix, mode, dirs)
    manifest = data.prepare(archive, tmp_path / "out", shard_size=3, progress=False)
    expected, samples = reference
    assert manifest["source_kind"] == "tar"
    assert manifest["classes"] == expected["classes"]
    assert manifest["class_counts"] == expected["class_counts"]
    assert {s["key"]: (s["label"], s["data"]) for s in data.read_samples(tmp_path / "out")} == samples
    # same keys, bytes and order: the shards are byte-identical to the folder's
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in expected["shards"]]


def test_tar_made_by_tar_C_root_dot_matches_the_folder(reference, tmp_path):
    """`tarfile.add(root, arcname=".")`, as `tar -C root -cf x.tar .` writes it: members ./cats/..."""
    root = _write_folder(tmp_path / "tree", _files())
    with tarfile.open(tmp_path / "dot.tar.gz", "w:gz") as tar:
        tar.add(root, arcname=".")
    manifest = data.prepare(tmp_path / "dot.tar.gz", tmp_path / "out", shard_size=3, progress=False)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference[0]["shards"]]


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_links_inside_the_archive_read_as_their_target(mode, suffix, tmp_path):
    """Hard links and symbolic links (relative, to a later member too) give the image they point to, as a
    folder walk follows them; a link pointing outside the archive is skipped."""
    root = _write_folder(tmp_path / "tree", _files())
    os.link(root / "cats/a.png", root / "dogs/hard.png")
    os.symlink("../cats/kaggle/b.png", root / "dogs/soft.png")
    os.symlink("../dogs/show/e.png", root / "birds/ahead.png")  # birds/ is archived before dogs/
    folder = data.prepare(root, tmp_path / "a", progress=False)
    with tarfile.open(tmp_path / f"t{suffix}", mode) as tar:
        tar.add(root, arcname="train")  # stores the hard link as LNKTYPE, the symlinks as SYMTYPE
        info = tarfile.TarInfo("train/dogs/outside.png")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/hostname.png"
        tar.addfile(info)
    packed = data.prepare(tmp_path / f"t{suffix}", tmp_path / "b", progress=False)
    assert packed["class_counts"] == folder["class_counts"] == {"birds": 3, "cats": 3, "dogs": 4}
    assert [s["sha256"] for s in packed["shards"]] == [s["sha256"] for s in folder["shards"]]


def test_stray_images_at_the_top_are_left_out_as_in_a_folder(tmp_path):
    files = _files()
    files["stray.png"] = _image("stray.png", 99)
    folder = data.prepare(_write_folder(tmp_path / "tree", files), tmp_path / "a", progress=False)
    packed = data.prepare(_write_tar(tmp_path / "t.tar", files, "./"), tmp_path / "b", progress=False)
    assert folder["class_counts"] == packed["class_counts"] == {"birds": 2, "cats": 3, "dogs": 2}


def test_single_class_archive(tmp_path):
    files = {"cats/a.png": _image("a.png", 1), "cats/b.png": _image("b.png", 2)}
    manifest = data.prepare(_write_tar(tmp_path / "t.tar", files, "wrap/"), tmp_path / "out", progress=False)
    assert manifest["classes"] == ["cats"] and manifest["num_samples"] == 2
    assert sorted(s["key"] for s in data.read_samples(tmp_path / "out")) == ["cats/a", "cats/b"]


def test_ambiguous_class_level_is_refused_naming_it(tmp_path):
    # train/ holds an image and image folders: a root with a stray file, or one class with sub-folders
    files = {"train/x.png": _image("x.png", 1), "train/cats/a.png": _image("a.png", 2)}
    archive = _write_tar(tmp_path / "t.tar", files)
    with pytest.raises(ValueError, match=r"t\.tar.*'train' holds images directly \('train/x.png'\).*cats"):
        data.prepare(archive, tmp_path / "out", progress=False)


def test_archive_without_class_directories_is_refused(tmp_path):
    archive = _write_tar(tmp_path / "flat.tar", {"a.png": _image("a.png", 1)})
    with pytest.raises(ValueError, match=r"flat\.tar.*class director"):
        data.prepare(archive, tmp_path / "out", progress=False)


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:xz", ".tar.xz")])
def test_cut_compressed_stream_names_the_file(mode, suffix, tmp_path):
    archive = _write_tar(tmp_path / f"src{suffix}", _files(), "", mode)
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"src{suffix} is truncated: (it ends inside member|its compressed stream)"):
        data.prepare(archive, tmp_path / "out", progress=False)


# where a tar (compressed whole afterwards, or not) is cut: member index -> byte offset in the tar
TAR_CUTS = {
    "inside a header": (lambda m: m.offset + 200, "is truncated: it ends inside the header after member"),
    "inside a member's data": (lambda m: m.offset_data + m.size // 2, "is truncated: it ends inside member"),
    "between members": (lambda m: m.offset, "is truncated: it ends after member .* without the end-of-archive"),
}


@pytest.mark.parametrize("compress", [None, "gz", "bz2"])
@pytest.mark.parametrize("cut", sorted(TAR_CUTS))
def test_truncated_tar_is_refused_not_read_short(cut, compress, tmp_path):
    """A cut tar used to give fewer images without a word (tarfile stops quietly at a short header)."""
    import bz2
    import gzip

    plain = _write_tar(tmp_path / "src.tar", _files())
    with tarfile.open(plain) as tar:
        members = tar.getmembers()
    at, message = TAR_CUTS[cut]
    blob = plain.read_bytes()[: at(members[len(members) // 2])]
    path = tmp_path / ("cut.tar" + (f".{compress}" if compress else ""))
    path.write_bytes({None: lambda b: b, "gz": gzip.compress, "bz2": bz2.compress}[compress](blob))
    with pytest.raises(ValueError, match=rf"cut\.tar.*{message}"):
        data.prepare(path, tmp_path / "out", progress=False)


def test_damaged_header_inside_a_tar_is_refused(tmp_path):
    plain = _write_tar(tmp_path / "src.tar", _files())
    with tarfile.open(plain) as tar:
        members = tar.getmembers()
    blob = bytearray(plain.read_bytes())
    blob[members[3].offset + 5] ^= 0xFF
    plain.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"src\.tar is damaged: the header after member {members[2].name!r}"):
        data.prepare(plain, tmp_path / "out", progress=False)


def test_tar_without_end_marker_zero_blocks_cut_is_accepted(reference, tmp_path):
    # only the end-of-archive marker is cut short: every member is there, as GNU tar accepts it
    plain = _write_tar(tmp_path / "src.tar", _files())
    with tarfile.open(plain) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size + (-(last.offset_data + last.size) % 512)
    plain.write_bytes(plain.read_bytes()[: end + 100])
    manifest = data.prepare(plain, tmp_path / "out", shard_size=3, progress=False)
    assert manifest["class_counts"] == reference[0]["class_counts"]


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io to count bytes read")
@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")])
def test_compressed_archive_is_read_in_one_streaming_pass(mode, suffix, tmp_path):
    """Bytes read by the process during prepare stay within one pass over the archive plus the scratch copy
    and the shard hashing; seeking back into the compressed stream for each shuffled image (the old reader)
    decompressed the archive again from its start, reading it about N / 2 times."""
    rng = np.random.default_rng(0)
    files = {}
    for i in range(300):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        files[f"c{i % 3}/{i:04d}.png"] = buf.getvalue()
    plain = _write_tar(tmp_path / "plain.tar", files)
    archive = _write_tar(tmp_path / f"src{suffix}", files, "", mode)
    before = _bytes_read()
    manifest = data.prepare(archive, tmp_path / "out", shard_size=100, progress=False)
    read = _bytes_read() - before
    assert manifest["num_samples"] == 300
    one_pass = archive.stat().st_size + 2 * plain.stat().st_size + sum(s["bytes"] for s in manifest["shards"])
    assert read < 2 * one_pass, f"read {read} bytes, one pass is about {one_pass}"


def test_scratch_copy_is_removed(tmp_path):
    archive = _write_tar(tmp_path / "src.tar.gz", _files(), "train/", "w:gz")
    data.prepare(archive, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 7


def test_pcpp_prepare_keeps_n_images_per_class_and_refuses_a_bad_limit(tmp_path, capsys):
    from pipelines.cli import main

    root = _write_folder(tmp_path / "tree", _files())
    assert main(["prepare", str(root), str(tmp_path / "out"), "--limit-per-class", "1", "--shard-size", "2"]) == 0
    assert "3 images, 3 classes" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["limit_per_class"] == 1 and manifest["num_samples"] == 3
    assert sorted(s["label"] for s in data.read_samples(tmp_path / "out")) == [0, 1, 2]
    assert main(["prepare", str(root), str(tmp_path / "bad"), "--limit-per-class", "0"]) == 2
    assert "limit_per_class must be positive, not 0" in capsys.readouterr().err
