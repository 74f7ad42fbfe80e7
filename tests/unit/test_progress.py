"""cluster.progress: the quiet console's filter drops known noise and never an error; --verbose undoes only ours."""

from __future__ import annotations

import re

import pytest

from cluster import progress
from pipelines.cli import build_parser

pytestmark = pytest.mark.unit

NOISE = [
    " 35%|###5      | 350/1000 [00:00<00:00, 3499.50img/s]",
    "read cifar10-train-4000.tar.gz: 1140file [00:00, 10076.02file/s]",
    "[2026-11-29 19:16:35,082 W 13565] PlacementGroupCleaner: Failed to query Ray Train Controller actor state",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1})",
    "Started training worker group of size 1: ",
    "- (ip=127.0.0.1, pid=13996) world_rank=0, local_rank=0, node_rank=0",
]
KEPT = [
    "Traceback (most recent call last):",
    "RuntimeError: injected failure after epoch 1",
    "stage train: started",
    "stage train: failed after 3.0 s: RuntimeError: boom",
    "demo-train epoch 1/2: loss 3.2776, binary acc 0.6010, forward acc 0.6970, 106.1 s",
    "warning: activation balance: 3 layers below the minimum",
]


def test_the_skip_regex_drops_noise_and_keeps_what_matters():
    skip = re.compile(progress.QUIET_SKIP)
    assert [line for line in NOISE if not skip.search(line)] == []
    assert [line for line in KEPT if skip.search(line)] == []


def test_set_verbose_sets_and_removes_only_its_own_filter(monkeypatch):
    for key in ("RAY_DEDUP_LOGS_SKIP_REGEX", "PCPP_SET_SKIP_REGEX", "PCPP_VERBOSE", "RAY_TRAIN_ENABLE_PRINT_PATCH",
                "PCPP_FUSED"):
        monkeypatch.setenv(key, "")  # recorded, so that whatever set_verbose writes is undone after the test
        monkeypatch.delenv(key)
    progress.set_verbose(False)
    assert not progress.verbose() and progress.os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == progress.QUIET_SKIP
    assert progress.worker_env() == {"PCPP_VERBOSE": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    progress.set_verbose(True)
    assert progress.verbose() and "RAY_DEDUP_LOGS_SKIP_REGEX" not in progress.os.environ
    assert progress.worker_env() == {"PCPP_VERBOSE": "1"}
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")  # the user's own filter stays, either way
    progress.set_verbose(False)
    progress.set_verbose(True)
    assert progress.os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine"


@pytest.mark.parametrize("value", ["0", "compile", "eager"])
def test_the_workers_get_the_drivers_pcpp_fused(monkeypatch, value):
    """Workers of a cluster started elsewhere do not inherit the driver's environment: worker_env passes
    PCPP_FUSED (pcpp.kernels' path) on when it is set, and leaves the workers' default alone otherwise."""
    from pcpp import kernels

    assert progress.FUSED_ENV == kernels.ENV
    monkeypatch.setenv("PCPP_FUSED", value)
    for verbose in (False, True):
        monkeypatch.setenv("PCPP_VERBOSE", "1" if verbose else "0")
        assert progress.worker_env()["PCPP_FUSED"] == value
    monkeypatch.delenv("PCPP_FUSED")
    assert "PCPP_FUSED" not in progress.worker_env()


def test_bar_outside_ray_is_tqdm_and_verbose_is_a_flag_of_run_train_sweep():
    from tqdm import tqdm

    b = progress.bar(range(3), desc="x", disable=True)
    assert isinstance(b, tqdm) and list(b) == [0, 1, 2]
    parser = build_parser()
    for cmd in ("run", "train", "sweep"):
        assert parser.parse_args([cmd, "c.yaml", "--verbose"]).verbose
        assert not parser.parse_args([cmd, "c.yaml"]).verbose
