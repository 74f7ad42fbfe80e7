"""The one place files and configs are hashed: sha256 of a file, and a short digest of JSON-able data.

Used for artifact files and stage keys (stages.artifact), shard manifests (stages.data.shards) and config
digests (stages.schema). pcpp's export format hashes its own file (pcpp.export), since pcpp imports
nothing from stages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time


def sha256_file(path: str | Path) -> str:
    """Hex sha256 (64 characters) of a file's bytes, read in 1 MiB chunks. FileNotFoundError if absent."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj) -> str:
    """JSON with sorted keys and no spaces (non-JSON values by their str): equal data, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj, length: int = 16) -> str:
    """The first `length` hex characters of the sha256 of `canonical(obj)`."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:length]
