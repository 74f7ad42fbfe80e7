"""bench/gpu_check.sh on a machine without a GPU: says so in one line and exits 0 (issue 10, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here: the script would run the full check, minutes of training")
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out")}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gpu_check: no usable GPU on this machine (torch "), out.stdout
    assert len(out.stdout.splitlines()) == 1 and not (tmp_path / "out").exists()  # nothing started, nothing written
