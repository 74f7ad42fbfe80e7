"""bench/table2_local.py: the Table 2 study without Ray or MLflow. Its tables from run directories (finished
runs in the tables, stopped and failed ones listed with their last epoch, never in a cell), a run's status,
and one real run through `run_one` in a fresh process (gloo, DeepSpeed, honest evaluation)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from multiprocessing import get_context
from pathlib import Path

import engine_fixtures  # noqa: E402  (tests/unit on sys.path, pytest's rootdir-less import mode)
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is a folder of scripts beside the packages, not an installed package
    sys.path.insert(0, str(REPO))
local = importlib.import_module("bench.table2_local")
shards = engine_fixtures.shards

pytestmark = pytest.mark.unit
PLAN = ["--variants", "fp,bnn,bnn++", "--tasks", "BW,BWA", "--epochs", "3"]


def write_run(root: Path, label: str, accs: list[float], *, result: str | None = None, record: str | None = None,
              forward_shift: float = 0.0) -> None:
    d = root / label
    d.mkdir(parents=True)
    (d / "epochs.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "binary_acc": a, "forward_acc": a + forward_shift, "forward_binary_gap":
                    forward_shift, "soft_fraction": 0.25, "epoch_time_s": 10.0, "images_per_s": 100.0}) + "\n"
        for i, a in enumerate(accs)))
    if result:
        (d / "result.json").write_text(json.dumps({"status": result, "message": "", "metrics": {}}))
    if record:
        (d / "bench.json").write_text(json.dumps({"invocations": [
            {"invocation": "x", "wall_s": 12.5, "status": record, "epochs_after": len(accs), "device": "cpu"}]}))


def test_report_only_tables_from_run_directories(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "fp-FP-s0", [0.80, 0.85, 0.875], result="finished", record="finished")
    write_run(root, "bnn-BW-s0", [0.70, 0.75, 0.8125], result="finished", record="finished")
    write_run(root, "bnn++-BW-s0", [0.60, 0.65], forward_shift=0.125)  # killed after epoch 2: no record
    write_run(root, "bnn-BWA-s0", [0.40], record="failed")  # the process raised: bench.json says so
    out = tmp_path / "report"
    assert local.main([*PLAN, "--report-only", "--run-root", str(root), "--out", str(out), "--commit", "abc"]) == 0
    md = (out / "table2.md").read_text()
    assert "| BW | 87.50 | 81.25 | n/a |" in md  # tasks down, variants across: fp, bnn, bnn++
    assert "| BWA | 87.50 | n/a | n/a |" in md
    assert "| bnn++-BW-s0 | stopped | 2 of 3 | 65.00 | 77.50 | +12.50 | 25.0 |" in md
    assert "| bnn-BWA-s0 | failed | 1 of 3 | 40.00 | 40.00 | +0.00 | 25.0 |" in md
    assert "| bnn++-BWA-s0 | pending | 0 |" in md  # planned, never started
    assert "commit abc" in md and "Tables rewritten from the run directories" in md
    assert (out / "table2.png").stat().st_size > 0
    assert (out / "table2.csv").read_text().splitlines()[1].startswith("BW,87.50,81.25,n/a")
    assert "| BW | 87.50" in capsys.readouterr().out


def test_parse_args():
    bench = importlib.import_module("bench.cifar10_resnet20")
    with pytest.raises(SystemExit, match="--workers 2"):
        local.parse_args([*PLAN, "--workers", "2"])
    with pytest.raises(SystemExit, match="--parallel 0"):
        local.parse_args([*PLAN, "--parallel", "0"])
    args = local.parse_args([*PLAN, "--parallel", "3", "--deepspeed", "v100", "--commit", "c"])
    assert (args.parallel, args.deepspeed, args.commit, args.epochs) == (3, "v100", "c", 3)
    assert bench.parse_args(PLAN).epochs == 3


def test_run_status(tmp_path):
    bench = importlib.import_module("bench.cifar10_resnet20")

    def status(label: str) -> str:
        return local.run_status(bench.Run("bnn", "BW", 0, tmp_path / label, {}))

    write_run(tmp_path, "a", [0.5], result="finished", record="failed")  # result.json wins
    write_run(tmp_path, "b", [0.5], record="failed")
    write_run(tmp_path, "c", [0.5])
    (tmp_path / "d").mkdir()
    assert [status(x) for x in "abcd"] == ["finished", "failed", "stopped", "pending"]


@pytest.mark.parametrize("target, args, message", [
    (os._exit, (3,), "exit code 3"),
    (os.abort, (), f"killed by signal {signal.SIGABRT.value}"),
])
def test_a_process_that_dies_is_failed_and_the_study_goes_on(tmp_path, target, args, message):
    bench = importlib.import_module("bench.cifar10_resnet20")
    run = bench.Run("bnn", "BW", 0, tmp_path / "run", {})
    run.run_dir.mkdir()
    process = get_context("spawn").Process(target=target, args=args)
    process.start()
    result = local.collect(run, process, 0.0)
    assert result["status"] == "failed" and message in result["message"] and "without a result" in result["message"]


@pytest.mark.parametrize("parallel, cores, expected", [
    (1, [0, 1], [[0, 1]]),
    (2, [0, 1], [[0], [1]]),
    (3, [3, 1, 2, 0, 4, 5, 6], [[0, 1, 2], [3, 4], [5, 6]]),  # sizes differ by one at most, sorted cores
    (3, [0, 1], [[0], [1], [0]]),  # more runs than cores: one core each, shared round-robin
    (8, list(range(16)), [[2 * k, 2 * k + 1] for k in range(8)]),
])
def test_core_slots(parallel, cores, expected):
    assert local.core_slots(parallel, cores) == expected


def _usable_cpus_on(cores, queue):
    os.sched_setaffinity(0, cores)
    queue.put(importlib.import_module("cluster.local").usable_cpus())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_usable_cpus_follows_the_affinity_mask():
    """What a pinned run's TrainingRun sizes its threads by: the process's cores, not the machine's."""
    context = get_context("spawn")
    queue = context.Queue()
    first = sorted(os.sched_getaffinity(0))[:1]
    process = context.Process(target=_usable_cpus_on, args=(first, queue))
    process.start()
    assert queue.get(timeout=60) == 1
    process.join()
    assert importlib.import_module("cluster.local").usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.integration
def test_one_run_in_its_own_process(shards, tmp_path):
    """A fresh process (spawn, as main runs them): gloo on CPU, TrainingRun, files in the run directory."""
    bench = importlib.import_module("bench.cifar10_resnet20")
    train, test = shards
    args = bench.parse_args(["--variants", "bnn", "--tasks", "BWA", "--epochs", "1", "--batch-size", "8",
                             "--epoch-length", "16", "--eval-limit", "8"])
    run = bench.plan(args, train, test, REPO / "pipelines" / "demo_data" / "resnet20-cifar10.th", tmp_path)[0]
    run.config["model"]["num_classes"] = 10
    run.config["algorithm"]["bn_recalibration_batches"] = 1
    slot = local.core_slots(2)[0]  # one core of two or more (the whole machine on a 1-core one)
    process = local.start(run, slot)  # a spawned process, as main runs them; its result through the run directory
    result = local.collect(run, process, 0.0)
    assert result["status"] == "finished", result["message"]
    assert result["device"] == "cpu" and result["wall_s"] > 0
    assert result["threads"] == len(slot)  # TrainingRun takes as many threads as the slot has cores, not all
    assert (run.run_dir / "config.resolved.json").exists()
    epochs = [json.loads(x) for x in (run.run_dir / "epochs.jsonl").read_text().splitlines()]
    assert len(epochs) == 1 and 0.0 <= epochs[0]["binary_acc"] <= 1.0
    assert json.loads((run.run_dir / "result.json").read_text())["status"] == "finished"
    assert (run.run_dir / "config.yaml").exists() and (run.run_dir / "final" / "model.pt").exists()
    assert importlib.import_module("bench.study").config_differences(run.run_dir, run.config) == []
    changed = {**run.config, "optim": {**run.config["optim"], "lr": 0.5}}
    assert "optim.lr" in " ".join(importlib.import_module("bench.study").config_differences(run.run_dir, changed))
    row = local.run_row(run)
    assert row["variant"] == "bnn" and row["task"] == "BWA" and row["value"] == epochs[0]["binary_acc"]
