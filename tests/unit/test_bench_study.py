"""bench/study.py: what a resumed study reruns, from run directories and a real SQLite MLflow store; seeds;
the study's parent run; and the bench's plan (bench/cifar10_resnet20.py) with extra seeds."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")]

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is a folder of scripts beside the packages, not an installed package
    sys.path.insert(0, str(REPO))
study = importlib.import_module("bench.study")


# -- seeds -------------------------------------------------------------------------------------------------
def test_extra_seeds():
    variants, tasks = ["fp", "bnn", "bnn++"], ["BW", "BWA"]
    assert study.parse_extra_seeds("", variants, tasks, 0) == {}
    assert study.parse_extra_seeds("bnn:BW:1, bnn++:bw:1,bnn++:BW:2,fp:FP:3", variants, tasks, 0) == {
        ("bnn", "BW"): [1], ("bnn++", "BW"): [1, 2], ("fp", "FP"): [3]}
    bad = {
        "bnn:BW": "is not VARIANT:TASK:SEED",
        "pq:BW:1": "variant 'pq' is not run; valid: fp, bnn, bnn++",
        "bnn:BWAA:1": "task 'BWAA' is not run for bnn; valid: BW, BWA",
        "fp:BW:1": "task 'BW' is not run for fp; valid: FP",
        "bnn:BW:one": "seed 'one' is not an integer",
        "bnn:BW:0": "seed 0 is already run for bnn BW",
        "bnn:BW:1,bnn:BW:1": "seed 1 is already run for bnn BW",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
            study.parse_extra_seeds(text, variants, tasks, 0)


# -- what is left ----------------------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, client, exp


def make_run_dir(root: Path, name: str, client, exp, *, epochs: int, mlflow: str | None, pcpp_status=None,
                 result: str | None = None) -> Path:
    """A run directory as stages.engine leaves it: epochs.jsonl, mlflow_run_id, result.json (when given), and
    its MLflow run ended with `mlflow` (FINISHED / FAILED, or left RUNNING) and tag pcpp.status."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if epochs:
        (run_dir / "epochs.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "binary_acc": 0.5}) + "\n"
                                                      for e in range(epochs)))
    if mlflow is not None:
        run_id = client.create_run(exp, tags={"pcpp.variant": "bnn", "pcpp.task": "BW"}).info.run_id
        (run_dir / "mlflow_run_id").write_text(run_id)
        if pcpp_status:
            client.set_tag(run_id, "pcpp.status", pcpp_status)
        if mlflow != "RUNNING":
            client.set_terminated(run_id, status=mlflow)
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps({"status": result, "message": "", "metrics": {},
                                                         "epochs_done": epochs}))
    return run_dir


def test_a_resumed_study_skips_done_runs_and_resumes_the_rest(store, tmp_path):
    uri, client, exp = store
    root = tmp_path / "runs"
    dirs = {
        "finished": make_run_dir(root, "bnn-BW-s0", client, exp, epochs=3, mlflow="FINISHED",
                                 pcpp_status="finished", result="finished"),
        "diverged": make_run_dir(root, "bc-BWAA-s0", client, exp, epochs=1, mlflow="FAILED",
                                 pcpp_status="diverged", result="diverged"),
        # killed mid-run (a reboot): its MLflow run stays RUNNING, one epoch of three checkpointed
        "killed": make_run_dir(root, "bnn-BWA-s0", client, exp, epochs=1, mlflow="RUNNING"),
        # a worker crash before any epoch: failed, nothing to resume from
        "failed": make_run_dir(root, "pc-BW-s0", client, exp, epochs=0, mlflow="FAILED", pcpp_status="failed",
                               result="failed"),
        "untouched": root / "bnn++-BW-s0",
    }
    states = {key: study.run_state(d, uri) for key, d in dirs.items()}
    assert {k: s.state for k, s in states.items()} == {"finished": "done", "diverged": "done", "killed": "partial",
                                                       "failed": "new", "untouched": "new"}
    assert [k for k, s in states.items() if s.left] == ["killed", "failed", "untouched"]
    assert (states["finished"].status, states["finished"].epochs) == ("finished", 3)
    assert states["diverged"].status == "diverged" and not states["finished"].mlflow_open
    assert states["killed"].epochs == 1 and states["failed"].status == "failed"
    assert states["finished"].run_id == (dirs["finished"] / "mlflow_run_id").read_text()


def test_a_run_done_whose_mlflow_run_was_never_closed(store, tmp_path):
    """The driver died after the workers wrote result.json, before it closed the MLflow run: not rerun, and
    its run is closed so that the report counts it."""
    uri, client, exp = store
    run_dir = make_run_dir(tmp_path / "runs", "bnn-BW-s0", client, exp, epochs=2, mlflow="RUNNING",
                           result="finished")
    state = study.run_state(run_dir, uri)
    assert (state.state, state.status, state.mlflow_open) == ("done", "finished", True)
    study.close_open_run(uri, run_dir, state)
    run = client.get_run(state.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pcpp.status"] == "finished"
    assert study.run_state(run_dir, uri) == study.RunState("done", "finished", 2, state.run_id)


def planned(tmp_path: Path, epochs: int) -> dict:
    return {"name": "bench-bnn-BW-s0", "seed": 0, "teacher": str(tmp_path / "teacher.th"),
            "model": {"name": "resnet20", "num_classes": 10},
            "data": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test"), "batch_size": 128},
            "binarize": {"weight": "bnn", "activation": None, "accumulator_bits": None, "units": "scaled"},
            "optim": {"name": "adam", "lr": 0.001, "epochs": epochs, "lr_schedule": "cosine"},
            "tracking": {"experiment": "bench", "run_root": str(tmp_path)}}


def test_config_differences(tmp_path):
    from stages.config import TrainConfig, absolute, build, write_run_config

    run_dir = tmp_path / "bnn-BW-s0"
    assert study.config_differences(run_dir, planned(tmp_path, 3)) == []  # nothing run yet
    write_run_config(run_dir, absolute(build(TrainConfig, planned(tmp_path, 3))))
    assert study.config_differences(run_dir, planned(tmp_path, 3)) == []
    assert study.config_differences(run_dir, planned(tmp_path, 1)) == ["optim.epochs: 3 -> 1"]
    more_workers = {**planned(tmp_path, 3), "distributed": {"max_failures": 5}}  # how, not what: no difference
    assert study.config_differences(run_dir, more_workers) == []


def test_config_differences_sees_a_changed_registered_default(tmp_path, monkeypatch):
    """A run made under one default of a pair, planned again after the default changed: a difference, though
    both configs only name the pair (config.resolved.json kept what it resolved to)."""
    from pcpp import specs
    from pcpp.schedules import constant
    from stages.config import TrainConfig, absolute, build, write_run_config

    bwa = {**planned(tmp_path, 3), "binarize": {"weight": "bnn+", "activation": "bnn+", "units": "scaled"}}
    run_dir = tmp_path / "bnn+-BWA-s0"
    monkeypatch.setitem(specs.ACTIVATION_SCHEDULES, "bnn+", {"mu": constant(5.0)})
    write_run_config(run_dir, absolute(build(TrainConfig, bwa)))
    assert study.config_differences(run_dir, bwa) == []
    monkeypatch.setitem(specs.ACTIVATION_SCHEDULES, "bnn+", {"mu": constant(2.0)})
    differs = study.config_differences(run_dir, bwa)
    assert differs == ["binarize.activation.params.mu.end: 5.0 -> 2.0",
                       "binarize.activation.params.mu.start: 5.0 -> 2.0"]


def test_config_differences_of_a_directory_without_its_resolved_config(tmp_path):
    """Made before config.resolved.json was written: what its pairs resolved to is unknown, so it differs
    (a binarized run; a full-precision one has no pairs)."""
    from stages.config import RESOLVED_CONFIG, TrainConfig, absolute, build

    run_dir = tmp_path / "bnn-BW-s0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(absolute(build(TrainConfig, planned(tmp_path, 3))).to_yaml())
    assert study.config_differences(run_dir, planned(tmp_path, 3)) == [
        f"the quantizer defaults it ran with: not recorded ({RESOLVED_CONFIG} is missing) -> {RESOLVED_CONFIG}"]
    fp = {**planned(tmp_path, 3), "binarize": None}
    (run_dir / "config.yaml").write_text(absolute(build(TrainConfig, fp)).to_yaml())
    assert study.config_differences(run_dir, fp) == []


def test_study_parent_run_and_wall_time(store, tmp_path):
    uri, client, _ = store
    root = tmp_path / "runs"
    root.mkdir()
    first = study.Study(root, uri, "bench", "table2", {"epochs": 3}, "abc123")
    parent = first.parent_run_id
    assert client.get_run(parent).data.tags[study.STUDY_TAG] == "table2"
    assert client.get_run(parent).data.params["epochs"] == "3"
    first.save(runs_done=1)  # then the machine reboots: no finish

    second = study.Study(root, uri, "bench", "table2", {"epochs": 3}, "def456")
    assert second.parent_run_id == parent  # the same parent run: one study in the MLflow UI
    assert second.commits == ["abc123", "def456"] and len(second.data["invocations"]) == 2
    second.finish(["bnn-BWA-s0"])
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and "bnn-BWA-s0" in run.data.tags["pcpp.message"]
    assert json.loads((root / study.STUDY_FILE).read_text())["parent_run_id"] == parent

    run_dir = root / "bnn-BW-s0"
    run_dir.mkdir()
    assert study.run_wall_s(run_dir) == 0
    study.record_run(run_dir, 12.5, "failed", 0, 1)
    study.record_run(run_dir, 30.25, "finished", 1, 3)
    assert study.run_wall_s(run_dir) == 42.75


def test_the_run_in_progress_is_on_record_before_it_ends(store, tmp_path):
    """What the heartbeat saves: a reboot mid-run still leaves that run's wall time so far in bench.json; the
    run's end replaces that entry instead of adding one."""
    uri, _, _ = store
    root = tmp_path / "runs"
    run_dir = root / "bnn-BW-s0"
    run_dir.mkdir(parents=True)
    study.record_run(run_dir, 100.0, "running", 0, 1, invocation="an earlier, killed invocation")
    the_study = study.Study(root, uri, "bench", "table2", {"epochs": 3}, "abc123")
    the_study.begin_run(run_dir)
    (run_dir / "epochs.jsonl").write_text(json.dumps({"epoch": 2}) + "\n")
    the_study.save()
    entries = json.loads((run_dir / study.RUN_RECORD).read_text())["invocations"]
    assert [(e["status"], e["epochs_after"]) for e in entries] == [("running", 1), ("running", 1)]
    assert entries[1]["invocation"] == the_study.invocation
    wall = the_study.end_run("finished")
    entries = json.loads((run_dir / study.RUN_RECORD).read_text())["invocations"]
    assert [e["status"] for e in entries] == ["running", "finished"]
    assert study.run_wall_s(run_dir) == pytest.approx(100.0 + wall, abs=1e-3)
    the_study.finish([])


def test_bench_plan_with_extra_seeds(tmp_path):
    bench = importlib.import_module("bench.cifar10_resnet20")
    args = bench.parse_args(["--variants", "fp,bnn,bnn++,pq", "--tasks", "BW,BWA", "--extra-seeds",
                             "bnn:BW:1,bnn++:BW:1"])
    runs = bench.plan(args, tmp_path / "train", tmp_path / "test", tmp_path / "t.th", tmp_path)
    assert [r.label for r in runs] == ["fp-FP-s0", "bnn-BW-s0", "bnn++-BW-s0", "pq-BW-s0", "bnn-BWA-s0",
                                       "bnn++-BWA-s0", "pq-BWA-s0", "bnn-BW-s1", "bnn++-BW-s1"]
    extra = runs[-1]
    assert extra.run_dir == tmp_path / "bnn++-BW-s1" and extra.config["seed"] == 1
    assert extra.config["name"] == "bench-bnn++-BW-s1" and runs[3].config["algorithm"]["rule"] == "pq"
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "bnn", "--extra-seeds", "bnn++:BW:1"])
