"""Artifacts and stage keys: what makes the pipeline cacheable and resumable.

A stage is `run(cfg, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict` (its metrics),
where `cfg` is the stage's own typed config (stages.registry) and nothing else; it writes files into
`out` and nothing else. The runner computes the stage key = hash(stage name, exactly that config, the
inputs' digests) (`stage_key`); an artifact is the directory `<root>/artifacts/<stage>-<key>`
with a `manifest.json` (stage, key, config, input digests, files with sha256, metrics). A rerun skips a
stage whose artifact exists and verifies; a half-written one is never visible (written to a temporary
directory, renamed when complete).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.hashing import digest, sha256_file

MANIFEST = "manifest.json"


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def digest(self) -> str:
        """Content digest: the key plus the files' hashes (what downstream keys depend on)."""
        return digest([self.key, self.manifest["files"]])

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise FileNotFoundError(f"artifact {self.path.name} has no file {name!r}; it has: "
                                    f"{', '.join(sorted(self.manifest['files']))}")
        return self.path / name


@dataclass
class StageContext:
    """What a stage may know about the run beyond its config and inputs."""

    root: Path
    tracking_uri: str | None = None
    experiment: str = "pcpp"
    pipeline_name: str = "pipeline"  # names the runs a stage starts (<pipeline>-<stage>)
    parent_run_id: str | None = None
    run_id: str | None = None  # this stage's MLflow child run
    extra: dict = field(default_factory=dict)


def config_dict(cfg) -> dict:
    """A stage config as plain data: a dataclass by its fields less the RUNTIME ones (how a run is carried
    out: checkpoint storage, restarts, placement; stages.config.keyed_dict), a dict as it is. So a relaunch
    with another failure budget or placement finds the same artifact and resumes it (another storage path
    is refused by the engine while the first holds the checkpoints)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        from stages.config import keyed_dict
        return keyed_dict(cfg)
    return dict(cfg)


def stage_key(stage: str, cfg, inputs: dict[str, Artifact]) -> str:
    """hash(stage name, exactly the config object the stage receives, its inputs' digests): 16 hex characters."""
    digests = {k: a.digest for k, a in sorted(inputs.items())}
    return digest({"stage": stage, "config": config_dict(cfg), "inputs": digests})


def artifact_dir(root: Path, stage: str, key: str) -> Path:
    return Path(root) / "artifacts" / f"{stage}-{key}"


def load_artifact(path: Path, verify: bool = True) -> Artifact:
    """Read an artifact; with verify, every file's sha256 must match (else ValueError naming it)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(f"{path} is not an artifact: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"artifact manifest {mpath} is corrupt: {e}") from None
    if verify:
        for name, digest in manifest["files"].items():
            f = path / name
            if not f.exists():
                raise ValueError(f"artifact {path.name}: file {name} is missing")
            if sha256_file(f) != digest:
                raise ValueError(f"artifact {path.name}: file {name} does not match its sha256 (changed or corrupt)")
    return Artifact(path, manifest)


def cached(root: Path, stage: str, key: str) -> Artifact | None:
    """The verified artifact of this stage key, or None (a broken one is moved aside, not trusted)."""
    path = artifact_dir(root, stage, key)
    if not (path / MANIFEST).exists():
        return None
    try:
        return load_artifact(path)
    except (ValueError, FileNotFoundError):
        shutil.move(str(path), str(path.with_name(path.name + f".broken-{int(time.time())}")))
        return None


def work_dir(root: Path, stage: str, key: str) -> Path:
    """The stage's scratch directory: kept across crashes so a stage can resume (training checkpoints)."""
    path = Path(root) / "work" / f"{stage}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def commit(root: Path, stage: str, key: str, cfg, inputs: dict[str, Artifact], out: Path,
           metrics: dict, started: float) -> Artifact:
    """Hash the files a stage wrote into `out` and publish them as the artifact (atomic rename)."""
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(out).as_posix()
        if rel != MANIFEST:
            files[rel] = sha256_file(f)
    manifest = {"stage": stage, "key": key, "config": config_dict(cfg),
                "inputs": {k: {"stage": a.stage, "key": a.key, "digest": a.digest} for k, a in inputs.items()},
                "files": files, "metrics": metrics, "seconds": round(time.time() - started, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    final = artifact_dir(root, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return Artifact(final, manifest)
