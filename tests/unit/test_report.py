"""The comparison table from a real SQLite MLflow store: cells, order, seeds, divergence, filters."""

from __future__ import annotations

import csv
import io
import math
import struct

import pytest

from pipelines.report import collect, grid, honesty_table, make_report, table, write_report
from pipelines.report_figure import figure_pixels

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")]


def log_run(client, exp_id, *, variant, task, seed, history, rule="pc++", pipeline="ft", status="finished",
            forward=None, soft=None, log_gap=True, parent=None):
    """A run tagged the way stages.engine tags it, with per-epoch histories of binary_acc and, when given,
    forward_acc (and forward_binary_gap = forward - binary, as stages.training logs it) and soft_fraction."""
    tags = {"pcpp.variant": variant, "pcpp.task": task, "pcpp.rule": rule, "pcpp.pipeline": pipeline,
            "pcpp.status": status}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    client.log_param(run_id, "seed", str(seed))
    client.log_param(run_id, "binarize.weight", variant)
    for epoch, value in enumerate(history, start=1):
        client.log_metric(run_id, "binary_acc", value, step=epoch)
        if forward is not None:
            client.log_metric(run_id, "forward_acc", forward[epoch - 1], step=epoch)
            if log_gap:
                client.log_metric(run_id, "forward_binary_gap", forward[epoch - 1] - value, step=epoch)
        if soft is not None:
            client.log_metric(run_id, "soft_fraction", soft[epoch - 1], step=epoch)
    client.set_terminated(run_id, status="FINISHED" if status == "finished" else "FAILED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("pcpp", artifact_location=(tmp / "artifacts").as_uri())
    log_run(client, exp, variant="bnn++", task="BW", seed=0, history=[0.50, 0.80, 0.8512],
            forward=[0.90, 0.88, 0.8790], soft=[0.9, 0.4, 0.125])
    log_run(client, exp, variant="bnn++", task="BW", seed=1, history=[0.40, 0.8640],  # last value counts
            forward=[0.60, 0.8650], soft=[0.5, 0.0], log_gap=False)  # gap from the two accuracies
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


def test_transposed_table_is_the_papers_layout(store):
    rows = collect(store, filter_tags={"pcpp.pipeline": "ft"})
    md, _ = table(rows, transpose=True)
    assert md.splitlines()[0] == "| task | fp | bnn | bnn++ | pq |"
    assert parse_md(md) == {"BW": {"fp": "91.20", "bnn": "81.34", "bnn++": "85.76 ± 0.91", "pq": "n/a"},
                            "BWA": {"fp": "91.20", "bnn": "diverged", "bnn++": "n/a", "pq": "65.43"}}
    g = grid(rows, transpose=True)
    assert (g.row_title, g.column_title, g.rows) == ("task", "variant", ["BW", "BWA"])
    # a study under way shows its whole planned layout: variants and tasks without runs yet are n/a
    fp_only = [r for r in rows if r["variant"] == "fp"]
    md, _ = table(fp_only, transpose=True, variants=["fp", "bc", "pq"], tasks=["BW", "BWAA"])
    assert parse_md(md) == {"BW": {"fp": "91.20", "bc": "n/a", "pq": "n/a"},
                            "BWAA": {"fp": "91.20", "bc": "n/a", "pq": "n/a"}}


def test_honesty_table(store):
    md, csv_text = honesty_table(collect(store, filter_tags={"pcpp.pipeline": "ft"}))
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.strip().splitlines()]
    assert lines[0] == ["variant", "task", "seed", "status", "binary %", "forward %", "gap (points)",
                        "soft fraction %"]
    body = lines[2:]
    # one line per run, in the accuracy table's order: variant, task, seed
    assert [tuple(line[:3]) for line in body] == [("fp", "FP", "0"), ("bnn", "BW", "0"), ("bnn", "BWA", "0"),
                                                  ("bnn++", "BW", "0"), ("bnn++", "BW", "1"), ("pq", "BWA", "0")]
    by_key = {tuple(line[:3]): line[3:] for line in body}
    # logged gap: 87.90 - 85.12 = 2.78 points; soft fraction 0.125 -> 12.5 %
    assert by_key[("bnn++", "BW", "0")] == ["finished", "85.12", "87.90", "+2.78", "12.5"]
    # no gap logged: forward - binary = 86.50 - 86.40 = 0.10 points
    assert by_key[("bnn++", "BW", "1")] == ["finished", "86.40", "86.50", "+0.10", "0.0"]
    assert by_key[("bnn", "BW", "0")] == ["finished", "81.34", "—", "—", "—"]  # nothing but binary_acc logged
    assert by_key[("bnn", "BWA", "0")][0] == "diverged"

    parsed = list(csv.DictReader(io.StringIO(csv_text)))
    assert len(parsed) == 6 and all(r["run_id"] for r in parsed)
    first = next(r for r in parsed if (r["variant"], r["seed"]) == ("bnn++", "0"))
    assert float(first["gap (points)"]) == pytest.approx(2.78) and float(first["soft fraction %"]) == 12.5


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_figure_and_its_mlflow_run(store, tmp_path):
    from matplotlib.image import imread
    from mlflow import MlflowClient

    files = make_report(store, tmp_path / "report", "pcpp", filter_tags={"pcpp.pipeline": "ft"})
    assert files.figure == tmp_path / "report" / "pcpp-binary_acc.png"
    assert png_size(files.figure) == figure_pixels(4, 2) == (695, 400)  # fp, bnn, bnn++, pq x BW, BWA
    assert imread(files.figure).shape[:2] == figure_pixels(4, 2)[::-1]  # decodes: height x width
    assert "## Honesty" in files.markdown.read_text(encoding="utf-8")

    # the runs share no parent: a run of its own, tagged pcpp.report, ended FINISHED, holds the report
    client = MlflowClient(store)
    run = client.get_run(files.run_id)
    assert run.data.tags["pcpp.report"] == "binary_acc pcpp.pipeline=ft" and run.info.status == "FINISHED"
    logged = {f.path: f.file_size for f in client.list_artifacts(files.run_id, "report")}
    assert logged == {f"report/{p.name}": p.stat().st_size for p in files.paths}
    assert len(logged) == 4
    # a second report with the same metric and filter replaces that run's files instead of adding a run
    again = make_report(store, tmp_path / "again", "pcpp", filter_tags={"pcpp.pipeline": "ft"}, figure=False)
    assert again.run_id == files.run_id and again.figure is None
    assert "report/pcpp-binary_acc.png" in {f.path for f in client.list_artifacts(files.run_id, "report")}
    assert len(collect(store, filter_tags={"pcpp.pipeline": "ft"})) == 6  # the report run is no row of it


def test_report_goes_to_the_shared_parent_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"mlflow.runName": "table2"}).info.run_id  # still RUNNING
    log_run(client, exp, variant="bnn", task="BW", seed=0, history=[0.80], forward=[0.81], soft=[0.0], parent=parent)
    log_run(client, exp, variant="bnn", task="BW", seed=1, history=[0.82], forward=[0.83], soft=[0.0], parent=parent)
    figure = tmp_path / "figs" / "table.png"
    files = make_report(uri, tmp_path / "out", "study", figure=figure, transpose=True)
    assert files.run_id == parent and files.figure == figure
    assert png_size(figure) == figure_pixels(1, 1)  # BW x bnn
    assert client.get_run(parent).info.status == "RUNNING"  # the parent's owner ends it, not the report
    assert {f.path for f in client.list_artifacts(parent, "report")} == {
        "report/study-binary_acc.md", "report/study-binary_acc.csv", "report/study-binary_acc-honesty.csv",
        "report/table.png"}
    assert parse_md(files.markdown.read_text(encoding="utf-8").split("\n\n")[1]) == {"BW": {"bnn": "81.00 ± 1.41"}}

    assert make_report(uri, tmp_path / "quiet", "study", log=False).run_id is None
    with pytest.raises(ValueError, match="no-such-run"):
        make_report(uri, tmp_path / "bad", "study", log_run_id="no-such-run")


def test_write_report(store, tmp_path):
    md_path, csv_path = write_report(store, tmp_path / "report", "pcpp")
    assert md_path.name == "pcpp-binary_acc.md" and csv_path.name == "pcpp-binary_acc.csv"
    text = md_path.read_text(encoding="utf-8")
    assert "| bnn++ (ft) | 85.76 ± 0.91 | n/a |" in text
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "variant,BW,BWA"
    assert (tmp_path / "report" / "pcpp-binary_acc-honesty.csv").exists()
    assert (tmp_path / "report" / "pcpp-binary_acc.png").exists()
