"""Data stage: shards written by prepare round-trip exactly; the loader splits, orders and sizes epochs."""

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from stages import data
from stages.hashing import sha256_file

CLASSES = [f"c{i}" for i in range(10)]
# the repository's CIFAR-10 JPEG sample: the first 100 test images of each class (pipelines/demo_data)
CIFAR_TEST_TAR = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data" / "cifar10-test-1000.tar.gz"


def _jpeg(rng: np.random.Generator, size: int = 32) -> bytes:
    # smooth colour fields plus noise: realistic enough for JPEG, and every image different
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR)).astype(np.int16)
    img = np.clip(img + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pixels(raw: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"))


def _make_folder(root: Path, per_class: int, seed: int = 0) -> dict[str, tuple[bytes, int]]:
    """ImageFolder of JPEGs; returns {sample key: (bytes, label)}."""
    rng = np.random.default_rng(seed)
    files = {}
    for label, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            raw = _jpeg(rng)
            (root / cls / f"{i:04d}.jpg").write_bytes(raw)
            files[f"{cls}/{i:04d}"] = (raw, label)
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "train"
    return root, _make_folder(root, per_class=100)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    data.prepare(folder[0], out, shard_size=100, progress=False)
    return out


def _keys_by_shard(shard_dir: Path) -> dict[str, str]:
    return {s["key"]: s["shard"] for s in data.read_samples(shard_dir)}


def _epoch(loader) -> tuple[list[str], list[torch.Tensor]]:
    keys, images = [], []
    for x, y, k in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.long and x.shape[1:] == (3, 32, 32)
        keys += k
        images.append(x)
    return keys, images


# ------------------------------------------------------------------------------------------------ prepare


@pytest.mark.unit
def test_imagefolder_round_trip(folder, shards):
    root, files = folder
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES
    assert manifest["num_samples"] == 1000 and manifest["class_counts"] == {c: 100 for c in CLASSES}
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(10)]
    assert all(s["num_samples"] == 100 for s in manifest["shards"])
    assert manifest["skipped"] == [] and manifest["image_size"] == [32, 32]

    samples = list(data.read_samples(shards))
    assert sorted(s["key"] for s in samples) == sorted(files)
    for s in samples:
        raw, label = files[s["key"]]
        assert s["field"] == "jpg" and s["data"] == raw and s["label"] == label

    pixels = np.stack([_pixels(raw) for raw, _ in files.values()]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(manifest["mean"], pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(manifest["std"], pixels.std(0), atol=1e-5)


@pytest.mark.unit
def test_eval_loader_returns_every_pixel_and_label(folder, shards):
    _, files = folder
    loader = data.make_loader(shards, train=False, batch_size=128, mean=(0, 0, 0), std=(1, 1, 1), with_keys=True)
    seen = 0
    for x, y, keys in loader:
        got = (x.numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        for img, label, key in zip(got, y.tolist(), keys):
            raw, expected = files[key]
            np.testing.assert_array_equal(img, _pixels(raw))
            assert label == expected
            seen += 1
    assert seen == 1000 and len(loader) == 8


@pytest.mark.unit
def test_tar_source_gives_the_same_shards(folder, shards, tmp_path):
    root, files = folder
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="train")  # train/<class>/<image>, directories included
    out = tmp_path / "out"
    manifest = data.prepare(archive, out, shard_size=100, progress=False)
    assert manifest["source_kind"] == "tar" and manifest["classes"] == CLASSES
    for s in data.read_samples(out):
        assert (s["data"], s["label"]) == files[s["key"]]
    reference = json.loads((shards / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference]


@pytest.mark.unit
def test_cifar_batches_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    names = ["truck", "cat", "airplane", "ship", "dog", "bird", "frog", "horse", "deer", "automobile"]
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))
    expected = {}
    for batch, n in (("data_batch_1", 300), ("data_batch_2", 200), ("test_batch", 100)):
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        (src / batch).write_bytes(pickle.dumps({b"data": images, b"labels": labels}))
        for i in range(n):
            expected[f"{batch}/{i:05d}"] = (images[i].reshape(3, 32, 32).transpose(1, 2, 0), names[labels[i]])

    train = data.prepare(src, tmp_path / "train", shard_size=128, progress=False)
    assert train["classes"] == sorted(names) and train["num_samples"] == 500 and len(train["shards"]) == 4
    keys = set()
    for s in data.read_samples(tmp_path / "train"):
        pixels, name = expected[s["key"]]
        assert s["field"] == "png"
        np.testing.assert_array_equal(_pixels(s["data"]), pixels)
        assert train["classes"][s["label"]] == name
        keys.add(s["key"])
    assert len(keys) == 500 and not any(k.startswith("test_batch") for k in keys)

    test = data.prepare(src, tmp_path / "test", split="test", progress=False)
    assert test["num_samples"] == 100 and test["split"] == "test"


@pytest.mark.unit
def test_corrupt_jpeg_is_named_or_skipped(tmp_path):
    root = tmp_path / "src"
    files = _make_folder(root, per_class=3)
    raw, _ = files["c4/0001"]
    (root / "c4" / "0001.jpg").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="c4/0001.jpg"):
        data.prepare(root, out, shard_size=10, progress=False)
    assert list(out.iterdir()) == []  # no manifest, no shards, no temporary directory

    manifest = data.prepare(root, out, shard_size=10, skip_corrupt=True, progress=False)
    assert manifest["skipped"] == ["c4/0001.jpg"] and manifest["num_skipped"] == 1
    assert manifest["num_samples"] == 29 and manifest["class_counts"]["c4"] == 2
    assert "c4/0001" not in {s["key"] for s in data.read_samples(out)}


@pytest.mark.unit
def test_bad_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.prepare(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class directories"):
        data.prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        data.prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(ValueError, match="no images"):
        data.prepare(tmp_path / "empty.tar", tmp_path / "out", progress=False)


@pytest.mark.unit
def test_reprepare_replaces_the_previous_shards(folder, tmp_path):
    out = tmp_path / "out"
    data.prepare(folder[0], out, shard_size=100, limit_per_class=20, progress=False)
    manifest = data.prepare(folder[0], out, shard_size=150, limit_per_class=20, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert [s["num_samples"] for s in manifest["shards"]] == [150, 50]
    assert data.verify(out) == manifest


@pytest.mark.unit
def test_verify_names_tampered_and_missing_shards(folder, tmp_path):
    out = tmp_path / "out"
    data.prepare(folder[0], out, shard_size=50, limit_per_class=10, progress=False)
    assert data.verify(out)["num_samples"] == 100
    shard = out / "shard-000001.tar"
    blob = bytearray(shard.read_bytes())
    blob[2000] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="shard-000001.tar"):
        data.verify(out)
    with pytest.raises(ValueError, match="shard-000001.tar"):
        list(data.make_loader(out, train=False, batch_size=10))
    shard.unlink()
    with pytest.raises(ValueError, match="shard-000001.tar.*missing"):
        data.verify(out)


@pytest.mark.unit
def test_loader_names_shard_and_key_of_an_undecodable_sample(folder, tmp_path):
    out = tmp_path / "out"
    data.prepare(folder[0], out, shard_size=50, limit_per_class=10, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["shards"][1]
    samples = [s for s in data.read_samples(out) if s["shard"] == target["name"]]
    with wds.TarWriter(str(out / target["name"]), encoder=False) as writer:
        for i, s in enumerate(samples):
            payload = b"not a jpeg" if i == 7 else s["data"]
            writer.write({"__key__": s["key"], "jpg": payload, "cls": str(s["label"]).encode()})
    target["sha256"] = sha256_file(out / target["name"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{target['name']}.*{samples[7]['key']}"):
        list(data.make_loader(out, train=True, batch_size=10, num_workers=2))


# ------------------------------------------------------------------------------------------------ loader


@pytest.mark.unit
@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 2), (3, 2), (2, 4)])
def test_assignment_gives_each_shard_to_one_rank_and_worker(world_size, num_workers):
    shards = [f"s{i}" for i in range(10)]
    for epoch in range(3):
        owners = Counter()
        for rank in range(world_size):
            for worker in range(num_workers):
                owners.update(
                    data.assign_shards(
                        shards,
                        rank=rank,
                        world_size=world_size,
                        worker=worker,
                        num_workers=num_workers,
                        epoch=epoch,
                        seed=5,
                    )
                )
        assert owners == Counter(shards)
    orders = {
        tuple(data.assign_shards(shards, rank=0, world_size=1, worker=0, num_workers=1, epoch=e)) for e in range(3)
    }
    assert len(orders) == 3


@pytest.mark.unit
def test_two_ranks_two_workers_read_every_shard_once_per_epoch(shards):
    shard_of = _keys_by_shard(shards)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = data.make_loader(
                shards, train=True, batch_size=50, num_workers=2, rank=rank, world_size=2, epoch=epoch, with_keys=True
            )
            keys, _ = _epoch(loader)
            assert len(keys) == loader.epoch_length == 500 and len(loader) == 10
            names = [s["name"] for s in loader.manifest["shards"]]
            expected = set()
            for worker in (0, 1):
                expected.update(
                    data.assign_shards(
                        names, rank=rank, world_size=2, worker=worker, num_workers=2, epoch=epoch, seed=0
                    )
                )
            assert {shard_of[k] for k in keys} == expected
            seen += keys
        assert sorted(seen) == sorted(shard_of)  # each of the 1,000 samples exactly once


@pytest.mark.unit
def test_order_depends_only_on_seed_and_epoch(shards):
    def run(**kw):
        return _epoch(data.make_loader(shards, train=True, batch_size=50, num_workers=2, with_keys=True, **kw))

    keys, images = run(seed=3)
    again_keys, again_images = run(seed=3)
    assert keys == again_keys
    assert all(torch.equal(a, b) for a, b in zip(images, again_images))  # augmentation too

    loader = data.make_loader(shards, train=True, batch_size=50, num_workers=2, with_keys=True, seed=3)
    assert _epoch(loader)[0] == keys
    loader.set_epoch(1)
    next_epoch = _epoch(loader)[0]
    assert next_epoch != keys and sorted(next_epoch) == sorted(keys)
    assert run(seed=4)[0] != keys


@pytest.mark.unit
@pytest.mark.parametrize("epoch_length", [300, 1000, 1500])
def test_epoch_length_is_fixed(shards, epoch_length):
    loader = data.make_loader(
        shards, train=True, batch_size=64, num_workers=2, epoch_length=epoch_length, with_keys=True, drop_last=False
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        keys, images = _epoch(loader)
        assert len(keys) == epoch_length and len(images) == len(loader) == -(-epoch_length // 64)
        counts = Counter(keys)
        assert max(counts.values()) == -(-epoch_length // 1000)  # repeats only when the epoch needs them
    dropped = data.make_loader(shards, train=True, batch_size=64, epoch_length=epoch_length)
    assert sum(len(y) for _, y in dropped) == epoch_length // 64 * 64 == len(dropped) * 64


@pytest.mark.unit
def test_uneven_shards_still_give_fixed_rank_epochs(folder, tmp_path):
    out = tmp_path / "out"
    manifest = data.prepare(folder[0], out, shard_size=300, progress=False)
    assert [s["num_samples"] for s in manifest["shards"]] == [300, 300, 300, 100]
    for rank in (0, 1):
        loader = data.make_loader(out, train=True, batch_size=100, num_workers=2, rank=rank, world_size=2)
        assert sum(len(y) for _, y in loader) == 500
    with pytest.raises(ValueError, match="cannot be split over 5 ranks"):
        data.make_loader(out, train=True, batch_size=8, rank=0, world_size=5)


@pytest.mark.unit
def test_loader_defaults_from_manifest(shards):
    manifest = data.load_manifest(shards)
    loader = data.make_loader(shards, train=False, batch_size=1000)
    ((x, y),) = list(loader)
    assert y.bincount().tolist() == [100] * 10
    # normalised with the manifest's statistics: zero mean and unit std per channel
    assert x.mean((0, 2, 3)).abs().max() < 1e-3
    assert (x.std((0, 2, 3)) - 1).abs().max() < 1e-3
    assert loader.classes == manifest["classes"]


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.integration
def test_cifar10_jpeg_slice(tmp_path):
    manifest = data.prepare(CIFAR_TEST_TAR, tmp_path, shard_size=200, limit_per_class=50, progress=False)
    assert manifest["classes"] == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert manifest["num_samples"] == 500 and set(manifest["class_counts"].values()) == {50}
    assert [s["num_samples"] for s in manifest["shards"]] == [200, 200, 100]
    assert all(0.3 < m < 0.6 for m in manifest["mean"]) and all(0.15 < s < 0.35 for s in manifest["std"])
    data.verify(tmp_path)
    with tarfile.open(CIFAR_TEST_TAR) as tar:
        for s in list(data.read_samples(tmp_path))[:20]:
            assert tar.extractfile(f"test/{s['key']}.jpg").read() == s["data"]
            assert manifest["classes"][s["label"]] == s["key"].split("/")[0]
    x, y = next(iter(data.make_loader(tmp_path, train=True, batch_size=64, num_workers=2)))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)


@pytest.mark.unit
def test_loader_config_is_built_once_and_fields_override_it(shards):
    cfg = data.LoaderConfig(batch_size=7, mean=(0, 0, 0), std=(1, 1, 1), with_keys=True)
    first = next(iter(data.make_loader(shards, cfg, train=False)))
    assert len(first) == 3 and len(first[1]) == 7  # with_keys and batch_size from the config
    x, y = next(iter(data.make_loader(shards, cfg, train=False, batch_size=3, with_keys=False)))
    assert len(y) == 3
    assert torch.equal(x, first[0][:3])  # the same samples, the same normalisation
    with pytest.raises(TypeError, match="unknown loader fields \\['batchsize'\\]; valid: batch_size"):
        data.make_loader(shards, cfg, train=False, batchsize=3)
    with pytest.raises(ValueError, match="batch_size must be positive, not 0"):
        data.LoaderConfig(batch_size=0)
