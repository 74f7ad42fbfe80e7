"""Data stage: image sources to webdataset shards, and a deterministic sharded loader.

`prepare` turns an ImageFolder tree, a tar of one (plain or compressed), or a CIFAR python-batch
directory into `shard-%06d.tar` files (fields `jpg` or `png`, and `cls`) plus a `manifest.json`; `verify`
re-hashes the shards; `make_loader` reads them split explicitly by rank and by DataLoader worker.

Modules, one idea each:
- `sources`: ImageFolder trees and CIFAR batches; `archive`: a tree inside a tar, and where its classes are;
- `shards`: the shard format, manifest, verification and reading (naming damaged shards);
- `splitting`: which rank and worker reads which shard in an epoch;
- `loader`: decoding, augmentation and batching into a fixed-length epoch;
- `stage`: `prepare` and the pipeline stage `run`.
"""

from stages.data.loader import LoaderConfig, ShardLoader, eval_loader, make_loader
from stages.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_FIELDS,
    MANIFEST,
    SHARD_PATTERN,
    load_manifest,
    read_samples,
    read_shard,
    verify,
)
from stages.data.sources import IMG_EXTENSIONS
from stages.data.splitting import assign_shards, node_split, worker_split
from stages.data.stage import DataStageConfig, open_source, prepare, run

__all__ = [
    "DataStageConfig",
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGE_FIELDS",
    "IMG_EXTENSIONS",
    "LoaderConfig",
    "MANIFEST",
    "SHARD_PATTERN",
    "ShardLoader",
    "assign_shards",
    "eval_loader",
    "load_manifest",
    "make_loader",
    "node_split",
    "open_source",
    "prepare",
    "read_samples",
    "read_shard",
    "run",
    "verify",
    "worker_split",
]
