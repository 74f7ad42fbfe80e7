"""`pcpp run` prints a short console by default (one line per stage, per epoch, per error; Ray's tqdm for bars)
and everything with --verbose (cluster.progress). Real subprocesses: the filter is read when Ray is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

QUIET_MAX_LINES = 60  # the bound of `make demo` (issue 10), here on a tiny pipeline


def _pipeline(tmp_path: Path, train: Path, test: Path, name: str) -> Path:
    cfg = {
        "name": name, "root": str(tmp_path / name), "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 32, "epoch_length": 320},
        "teacher": {"source": "train", "epochs": 1, "lr": 0.01},
        "binarize": {"weight": "bnn++"},
        "train": {"init": "teacher", "optim": {"epochs": 2, "lr": 0.005}},
        "sensitivity": {"enabled": False}, "export": {"enabled": True},
        "distributed": {"num_workers": 1, "zero_stage": 1}, "tracking": {"experiment": name},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _console(config: Path, *flags: str) -> list[str]:
    """The lines `pcpp run` prints (stdout and stderr together) before its summary."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX")}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), *flags],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=1200)
    # Bytes, split at \n only, as `wc -l` counts (text mode would turn a live bar's \r redraws into lines).
    lines = out.stdout.decode(errors="replace").split("\n")
    assert out.returncode == 0, "\n".join(lines[-40:])
    name = config.stem
    end = next(i for i, line in enumerate(lines) if f"pipeline {name}: " in line and " stages in " in line)
    return lines[:end]


def test_quiet_console_is_short_and_verbose_restores_it(tiny_shards, tmp_path):
    train, test = tiny_shards
    quiet = _console(_pipeline(tmp_path, train, test, "tiny-quiet"))
    assert len(quiet) <= QUIET_MAX_LINES, "\n".join(quiet)
    text = "\n".join(quiet)
    for stage in ("data", "teacher", "train", "export"):  # one start and one end line each
        assert sum(f"stage {stage}: started" in line for line in quiet) == 1, text
        assert sum(f"stage {stage}: finished in" in line for line in quiet) == 1, text
    assert sum("tiny-quiet" in line and " epoch " in line and "binary acc" in line for line in quiet) >= 2, text
    assert not any("PlacementGroupCleaner" in line for line in quiet), text

    verbose = _console(_pipeline(tmp_path, train, test, "tiny-verbose"), "--verbose")
    assert len(verbose) > len(quiet), "\n".join(verbose)
    assert any("Started training worker group" in line for line in verbose), "\n".join(verbose)
