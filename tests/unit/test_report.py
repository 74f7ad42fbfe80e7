"""The comparison table from a real SQLite MLflow store: cells, order, seeds, divergence, filters."""

from __future__ import annotations

import csv
import io
import math

import pytest

from pipelines.report import collect, table, write_report

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")]


def log_run(client, exp_id, *, variant, task, seed, history, rule="pc++", pipeline="ft", status="finished"):
    """A run tagged the way stages.engine tags it, with a per-epoch metric history."""
    run = client.create_run(exp_id, tags={"pcpp.variant": variant, "pcpp.task": task, "pcpp.rule": rule,
                                          "pcpp.pipeline": pipeline, "pcpp.status": status})
    run_id = run.info.run_id
    client.log_param(run_id, "seed", str(seed))
    client.log_param(run_id, "binarize.weight", variant)
    for epoch, value in enumerate(history, start=1):
        client.log_metric(run_id, "binary_acc", value, step=epoch)
    client.set_terminated(run_id, status="FINISHED" if status == "finished" else "FAILED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("pcpp", artifact_location=(tmp / "artifacts").as_uri())
    log_run(client, exp, variant="bnn++", task="BW", seed=0, history=[0.50, 0.80, 0.8512])
    log_run(client, exp, variant="bnn++", task="BW", seed=1, history=[0.40, 0.8640])  # last value counts
    log_run(client, exp, variant="bnn", task="BW", seed=0, history=[0.70, 0.8134])
    log_run(client, exp, variant="bnn", task="BWA", seed=0, history=[0.3, math.nan], status="diverged")
    log_run(client, exp, variant="pc", task="BWA", seed=0, history=[0.62, 0.6543], rule="pq")
    log_run(client, exp, variant="fp", task="FP", seed=0, history=[0.9120])
    log_run(client, exp, variant="bnn++", task="BWA", seed=0, history=[0.7777], pipeline="e2e")  # filtered below
    running = client.create_run(exp, tags={"pcpp.variant": "bc", "pcpp.task": "BW", "pcpp.pipeline": "ft"})
    client.log_metric(running.info.run_id, "binary_acc", 0.5, step=1)  # still RUNNING: not in the table
    client.create_run(exp, tags={"pcpp.pipeline": "ft"})  # a pipeline parent run: no variant
    return uri


def parse_md(md: str) -> dict[str, dict[str, str]]:
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.strip().splitlines()]
    header, body = lines[0], lines[2:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_collect_rows(store):
    rows = collect(store, filter_tags={"pcpp.pipeline": "ft"})
    assert len(rows) == 6  # the running run, the parent and the e2e run are left out
    by_key = {(r["variant"], r["task"], r["seed"]): r for r in rows}
    r = by_key[("bnn++", "BW", 1)]
    assert r["value"] == pytest.approx(0.8640) and r["status"] == "finished" and r["rule"] == "pc++"
    assert r["pipeline"] == "ft" and isinstance(r["seed"], int) and r["run_id"]
    assert by_key[("bnn", "BWA", 0)]["status"] == "diverged"
    assert by_key[("pc", "BWA", 0)]["rule"] == "pq"
    assert collect(store, experiment="no-such-experiment") == []
    assert len(collect(store)) == 7


def test_table_cells(store):
    md, csv_text = table(collect(store, filter_tags={"pcpp.pipeline": "ft"}))
    cells = parse_md(md)
    # columns: the tasks present, in paper order; rows: fp first, registry order, then the rules
    assert md.splitlines()[0] == "| variant | BW | BWA |"
    assert list(cells) == ["fp", "bnn", "bnn++", "pq"]
    # two seeds: mean and sample std of 85.12 and 86.40, by hand
    mean = (85.12 + 86.40) / 2
    std = math.sqrt(((85.12 - mean) ** 2 + (86.40 - mean) ** 2) / (2 - 1))
    assert cells["bnn++"]["BW"] == f"{mean:.2f} ± {std:.2f}" == "85.76 ± 0.91"
    assert cells["bnn++"]["BWA"] == "n/a"
    assert cells["bnn"] == {"BW": "81.34", "BWA": "diverged"}
    assert cells["pq"] == {"BW": "n/a", "BWA": "65.43"}
    assert cells["fp"] == {"BW": "91.20", "BWA": "91.20"}  # the FP reference fills every column

    parsed = list(csv.reader(io.StringIO(csv_text)))
    assert parsed[0] == ["variant", "BW", "BWA"]
    assert {row[0]: row[1:] for row in parsed[1:]} == {label: list(c.values()) for label, c in cells.items()}


def test_mixed_pipelines_are_split(store):
    cells = parse_md(table(collect(store))[0])
    assert cells["bnn++ (ft)"]["BW"] == "85.76 ± 0.91"
    assert cells["bnn++ (e2e)"] == {"BW": "n/a", "BWA": "77.77"}
    assert list(cells).index("bnn++ (e2e)") < list(cells).index("bnn++ (ft)")


def test_partly_diverged_cell_and_rerun_seed():
    rows = [
        {"variant": "ede", "task": "BWAA", "rule": "pc++", "pipeline": "ft", "seed": 0, "status": "finished",
         "value": 0.60},
        {"variant": "ede", "task": "BWAA", "rule": "pc++", "pipeline": "ft", "seed": 1, "status": "diverged",
         "value": 0.10},
        {"variant": "ede", "task": "BWAA", "rule": "pc++", "pipeline": "ft", "seed": 0, "status": "finished",
         "value": 0.62},  # a rerun of seed 0 replaces the first one
    ]
    md, _ = table(rows)
    assert parse_md(md) == {"ede": {"BWAA": "62.00 (1/2 diverged)"}}
    assert table([]) == ("| variant |\n|---|\n", "variant\n")


def test_write_report(store, tmp_path):
    md_path, csv_path = write_report(store, tmp_path / "report", "pcpp")
    assert md_path.name == "pcpp-binary_acc.md" and csv_path.name == "pcpp-binary_acc.csv"
    text = md_path.read_text(encoding="utf-8")
    assert "| bnn++ (ft) | 85.76 ± 0.91 | n/a |" in text
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "variant,BW,BWA"
