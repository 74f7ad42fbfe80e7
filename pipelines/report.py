"""The paper-style comparison table (Tables 2-4 of the paper) from the runs logged in MLflow.

Rows are the variants (the registered quantizers in registry order, `fp` first, then the update rules
`pq`, `rpc`, `ptb`), columns the tasks BW, BWA, BWAA that have runs. A cell is the last logged value of
the metric (by default `binary_acc`, the honest binarized network) in percent: `mean ± std` over seeds
(sample std) when there are several, `diverged` when every run of the cell diverged, `n/a` when none ran.

Which run is which comes from the tags stages.engine writes: `pcpp.variant` (the weight quantizer),
`pcpp.task`, `pcpp.rule`, `pcpp.pipeline`, `pcpp.status`; the seed is the `seed` param.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from pcpp.quantizers import names as quantizer_names
from pcpp.tasks import FP as FP_TASK  # runs without binarization: the reference of every column
from pcpp.tasks import TASKS

RULE_ROWS = ("pq", "rpc", "ptb")  # update rules that replace the pair's role: a row of their own
REPORTED = ("finished", "diverged")  # run states that belong in the table; running / failed runs do not
_MLFLOW_STATUS = {"FINISHED": "finished", "FAILED": "failed", "RUNNING": "running", "SCHEDULED": "running",
                  "KILLED": "killed"}


def _filter_string(filter_tags: dict | None) -> str:
    clauses = []
    for key, value in (filter_tags or {}).items():
        value = str(value)
        if "'" in value or "`" in key:
            raise ValueError(f"cannot filter on tag {key!r} = {value!r}: quotes are not supported")
        clauses.append(f"tags.`{key}` = '{value}'")
    return " and ".join(clauses)


def _last_value(history) -> float | None:
    if not history:
        return None
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def collect(tracking_uri: str, experiment: str = "pcpp", metric: str = "binary_acc",
            filter_tags: dict | None = None) -> list[dict]:
    """One row per finished (or diverged) training run of `experiment` that carries a `pcpp.variant` tag.

    A row: run_id, variant, task, rule, pipeline, seed (int, or None without a `seed` param), status
    (`pcpp.status`, else derived from the MLflow run status), value (the last value of `metric`'s history
    by step, None if never logged), start_time. `filter_tags` keeps runs whose tags equal the given values,
    e.g. {"pcpp.pipeline": "ft", "pcpp.units": "scaled"}. Rows come in order of start time.
    """
    from stages.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=_filter_string(filter_tags),
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    rows = []
    for run in runs:
        tags = run.data.tags
        if "pcpp.variant" not in tags:  # pipeline parents, non-training stages
            continue
        status = tags.get("pcpp.status") or _MLFLOW_STATUS.get(run.info.status, run.info.status.lower())
        if status not in REPORTED:
            continue
        seed = run.data.params.get("seed")
        try:
            seed = int(seed) if seed is not None else None
        except ValueError:
            pass
        rows.append({
            "run_id": run.info.run_id,
            "variant": tags["pcpp.variant"],
            "task": tags.get("pcpp.task"),
            "rule": tags.get("pcpp.rule", "pc++"),
            "pipeline": tags.get("pcpp.pipeline"),
            "seed": seed,
            "status": status,
            "value": _last_value(client.get_metric_history(run.info.run_id, metric)),
            "start_time": run.info.start_time,
        })
    return rows


def row_label(row: dict) -> str:
    """The table row of a run: its update rule for pq / rpc / ptb, else its weight quantizer."""
    return row["rule"] if row.get("rule") in RULE_ROWS else row["variant"]


def _label_order(labels) -> list[str]:
    registry = list(quantizer_names())
    order = ["fp"] + [n for n in registry if n != "fp"] + list(RULE_ROWS)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(labels, key=lambda label: (rank.get(label, len(order)), label))


def _cell(runs: list[dict]) -> str:
    """`mean ± std` (sample std over seeds) of the finished runs' values in %, `diverged` or `n/a`."""
    if not runs:
        return "n/a"
    by_seed: dict = {}
    for i, r in enumerate(runs):  # a rerun of a seed replaces it (rows come in start order)
        by_seed[r["seed"] if r["seed"] is not None else ("run", i)] = r
    runs = list(by_seed.values())
    diverged = sum(r["status"] == "diverged" for r in runs)
    values = [100.0 * r["value"] for r in runs
              if r["status"] == "finished" and r["value"] is not None and math.isfinite(r["value"])]
    if not values:
        return "diverged" if diverged else "n/a"
    text = f"{values[0]:.2f}" if len(values) == 1 else \
        f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    return f"{text} ({diverged}/{len(runs)} diverged)" if diverged else text


def table(rows: list[dict]) -> tuple[str, str]:
    """(markdown, csv) of the comparison: variants down, tasks across; see the module docstring.

    Full-precision runs (task FP) fill every column of the `fp` row. When the rows mix pipelines (FT and
    E2E), each row label carries its pipeline, e.g. `bnn++ (ft)`, so that they are never averaged together.
    """
    columns = [t for t in TASKS if any(r["task"] == t for r in rows)]
    if not columns and any(r["task"] == FP_TASK for r in rows):
        columns = [FP_TASK]
    pipelines = sorted({r["pipeline"] for r in rows}, key=str)
    split = len(pipelines) > 1

    cells: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        label = row_label(r)
        for task in (columns if r["task"] == FP_TASK else [r["task"]]):
            if task in columns:
                cells.setdefault((label, r["pipeline"] if split else "", task), []).append(r)
    keys = {(label, pipe) for label, pipe, _ in cells}
    ordered = [(label, pipe) for label in _label_order({k[0] for k in keys})
               for pipe in (pipelines if split else [""]) if (label, pipe) in keys]

    header = ["variant"] + columns
    body = [[f"{label} ({pipe})" if split else label] + [_cell(cells.get((label, pipe, t), [])) for t in columns]
            for label, pipe in ordered]

    md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    md += ["| " + " | ".join(line) + " |" for line in body]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return "\n".join(md) + "\n", buf.getvalue()


def write_report(tracking_uri: str, out_dir: str | Path, experiment: str = "pcpp", *, metric: str = "binary_acc",
                 filter_tags: dict | None = None) -> tuple[Path, Path]:
    """Collect, tabulate and write `<out_dir>/<experiment>-<metric>.md` and `.csv`; returns both paths."""
    rows = collect(tracking_uri, experiment, metric=metric, filter_tags=filter_tags)
    md, csv_text = table(rows)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / f"{experiment}-{metric}.md", out / f"{experiment}-{metric}.csv"
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    note = (f"{metric} in % at the last logged epoch, mean ± sample std over seeds {seeds} where a cell has "
            f"several runs; {len(rows)} runs of experiment `{experiment}`"
            + (f" with tags {filter_tags}" if filter_tags else "") + ".")
    md_path.write_text(f"# {experiment}: {metric}\n\n{md}\n{note}\n", encoding="utf-8")
    csv_path.write_text(csv_text, encoding="utf-8")
    return md_path, csv_path
