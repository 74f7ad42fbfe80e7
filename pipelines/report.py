"""The paper-style comparison (Tables 2-4 of the paper) from the runs logged in MLflow: two tables and a figure.

Accuracy table: rows are the variants (the registered quantizers in registry order, `fp` first, then the
update rules `pq`, `rpc`, `ptb`), columns the tasks BW, BWA, BWAA that have runs (`transpose=True` gives the
paper's layout: tasks down, variants across). A cell is the last logged value of the metric (by default
`binary_acc`, the honest binarized network) in percent: `mean ± std` over seeds (sample std) when there are
several, `diverged` when every run of the cell diverged, `refused` when the activation guard refused them,
`n/a` when none ran.

Honesty table: one line per run of the accuracy table (a rerun of a seed replaces it there and here): its
final honest `binary_acc`, training-forward `forward_acc`, their gap `forward_binary_gap` (forward minus
binary, in points; computed from the two when not logged) and `soft_fraction` (the share of binarized
weights whose training-forward value is more than 1% of s away from +-s), all as stages.training logs
them per epoch. A large gap or soft fraction means the run has not binarized, whatever its forward says.

Figure (pipelines.report_figure): the accuracy table as a heatmap with the cells written in, n/a grey,
diverged hatched.

Where the report goes in MLflow (`log_report`): the markdown, both CSVs and the PNG are logged as artifacts
under `report/` of one run, chosen as a user browsing the UI would look for them:
- the parent run the reported runs share, when they all have the same one (a sweep's run, a pipeline's
  run, the CIFAR-10 bench's study run `bench/cifar10_resnet20.py`): the comparison sits beside its runs;
- otherwise a run named `report` tagged `pcpp.report` (metric and filter) in the same experiment, created
  on first use and reused (its artifacts replaced) by every later report with the same metric and filter;
- or the run given explicitly (`run_id`).

Which run is which comes from the tags stages.engine writes: `pcpp.variant` (the weight quantizer),
`pcpp.task`, `pcpp.rule`, `pcpp.pipeline`, `pcpp.status`; the seed is the `seed` param.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pcpp.quantizers import names as quantizer_names
from pcpp.tasks import FP as FP_TASK  # runs without binarization: the reference of every column
from pcpp.tasks import TASKS

RULE_ROWS = ("pq", "rpc", "ptb")  # update rules that replace the pair's role: a row of their own
REPORTED = ("finished", "diverged", "refused")  # run states that belong in the table; running / failed ones do not
HONESTY_METRICS = ("binary_acc", "forward_acc", "forward_binary_gap", "soft_fraction")
REPORT_TAG = "pcpp.report"  # marks the run that holds the report when the runs share no parent
PARENT_TAG = "mlflow.parentRunId"
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
            filter_tags: dict | None = None, run_ids=None) -> list[dict]:
    """One row per finished (or diverged) training run of `experiment` that carries a `pcpp.variant` tag.

    A row: run_id, variant, task, rule, pipeline, seed (int, or None without a `seed` param), status
    (`pcpp.status`, else derived from the MLflow run status), value (the last value of `metric`'s history
    by step, None if never logged), metrics (the last value of `metric` and of each HONESTY_METRICS, None
    when not logged), parent_run_id, start_time. `filter_tags` keeps runs whose tags equal the given values,
    e.g. {"pcpp.pipeline": "ft", "pcpp.units": "scaled"}; `run_ids`, when given, keeps only those runs.
    Rows come in order of start time.
    """
    from stages.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    wanted = None if run_ids is None else set(run_ids)
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
        if "pcpp.variant" not in tags:  # pipeline parents, report runs, non-training stages
            continue
        if wanted is not None and run.info.run_id not in wanted:
            continue
        status = tags.get("pcpp.status") or _MLFLOW_STATUS.get(run.info.status, run.info.status.lower())
        if status not in REPORTED:
            continue
        seed = run.data.params.get("seed")
        try:
            seed = int(seed) if seed is not None else None
        except ValueError:
            pass
        metrics = {name: _last_value(client.get_metric_history(run.info.run_id, name))
                   for name in dict.fromkeys((metric, *HONESTY_METRICS))}
        rows.append({
            "run_id": run.info.run_id,
            "variant": tags["pcpp.variant"],
            "task": tags.get("pcpp.task"),
            "rule": tags.get("pcpp.rule", "pc++"),
            "pipeline": tags.get("pcpp.pipeline"),
            "seed": seed,
            "status": status,
            "value": metrics[metric],
            "metrics": metrics,
            "parent_run_id": tags.get(PARENT_TAG),
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


def _latest_per_seed(runs: list[dict]) -> list[dict]:
    """A rerun of a seed replaces it (rows come in start order); runs without a seed all count."""
    by_seed: dict = {}
    for i, r in enumerate(runs):
        by_seed[r["seed"] if r["seed"] is not None else ("run", i)] = r
    return list(by_seed.values())


@dataclass(frozen=True)
class Cell:
    """One table cell: the finished runs' values in %, and how many of its runs (one per seed) diverged."""

    values: tuple[float, ...] = ()
    diverged: int = 0
    runs: int = 0
    refused: int = 0  # runs the activation guard refused before training (stages.activations)

    @classmethod
    def of(cls, runs: list[dict]) -> Cell:
        runs = _latest_per_seed(runs)
        values = tuple(100.0 * r["value"] for r in runs if r["status"] == "finished" and r["value"] is not None
                       and math.isfinite(r["value"]))
        return cls(values, sum(r["status"] == "diverged" for r in runs), len(runs),
                   sum(r["status"] == "refused" for r in runs))

    @property
    def state(self) -> str:
        """'value' when some run finished, else 'diverged' when some diverged, 'refused' when the activation
        guard refused them, else 'n/a'."""
        return "value" if self.values else (
            "diverged" if self.diverged else ("refused" if self.refused else "n/a"))

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def text(self) -> str:
        """`mean ± std` (sample std over seeds) in %, with `(k/n diverged)` when some diverged; or the state."""
        if not self.values:
            return self.state
        text = f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"
        return f"{text} ({self.diverged}/{self.runs} diverged)" if self.diverged else text


@dataclass
class Grid:
    """The accuracy table before formatting: row and column names, titles, and the cell of each pair."""

    row_title: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    @property
    def column_title(self) -> str:
        return "task" if self.row_title == "variant" else "variant"

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.get((row, column), Cell())


def _split(rows: list[dict]) -> tuple[list[str], bool]:
    pipelines = sorted({r["pipeline"] for r in rows}, key=str)
    return pipelines, len(pipelines) > 1


def _label(label: str, pipeline, split: bool) -> str:
    return f"{label} ({pipeline})" if split else label


def grid(rows: list[dict], transpose: bool = False, *, variants=(), tasks=()) -> Grid:
    """Variants down and tasks across (tasks down with `transpose`); see the module docstring.

    Full-precision runs (task FP) fill every column of the `fp` row. When the rows mix pipelines (FT and
    E2E), each row label carries its pipeline, e.g. `bnn++ (ft)`, so that they are never averaged together.
    `variants` (row labels) and `tasks` are shown even when none of their runs is in `rows` (cells n/a): a
    study's whole layout while it is under way.
    """
    present = {r["task"] for r in rows} | set(tasks)
    columns = [t for t in TASKS if t in present]
    if not columns and FP_TASK in present:
        columns = [FP_TASK]
    pipelines, split = _split(rows)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        for task in (columns if r["task"] == FP_TASK else [r["task"]]):
            if task in columns:
                groups.setdefault((row_label(r), r["pipeline"] if split else "", task), []).append(r)
    keys = {(label, pipe) for label, pipe, _ in groups} | ({(v, "") for v in variants} if not split else set())
    ordered = [(label, pipe) for label in _label_order({k[0] for k in keys})
               for pipe in (pipelines if split else [""]) if (label, pipe) in keys]
    labels = [_label(label, pipe, split) for label, pipe in ordered]
    cells = {(_label(label, pipe, split), task): Cell.of(runs) for (label, pipe, task), runs in groups.items()}
    if not transpose:
        return Grid("variant", labels, columns, cells)
    return Grid("task", columns, labels, {(task, label): c for (label, task), c in cells.items()})


def _markdown(header: list[str], body: list[list[str]], left: int = 1) -> str:
    """A markdown table: the first `left` columns aligned left (names), the others right (numbers)."""
    md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    md += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(md) + "\n"


def _csv(header: list[str], body: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def table(rows: list[dict], transpose: bool = False, *, variants=(), tasks=()) -> tuple[str, str]:
    """(markdown, csv) of the accuracy table: variants down, tasks across (tasks down with `transpose`);
    `variants` and `tasks` as in `grid`."""
    g = grid(rows, transpose, variants=variants, tasks=tasks)
    header = [g.row_title] + g.columns
    body = [[name] + [g.cell(name, c).text for c in g.columns] for name in g.rows]
    return _markdown(header, body), _csv(header, body)


HONESTY_HEADER = ["variant", "task", "seed", "status", "binary %", "forward %", "gap (points)", "soft fraction %"]


def _seed_key(row: dict) -> tuple:
    seed = row["seed"]
    return (not isinstance(seed, int), seed if isinstance(seed, int) else str(seed))


def honesty_rows(rows: list[dict]) -> list[dict]:
    """The runs the accuracy table counts, in its order (variant, task, seed), each with its final honest
    accuracy, training-forward accuracy, gap (forward - binary) and soft fraction, in % (None: not logged)."""
    _, split = _split(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((row_label(r), r["pipeline"] if split else "", r["task"]), []).append(r)
    task_rank = {t: i for i, t in enumerate((FP_TASK, *TASKS))}
    label_rank = {label: i for i, label in enumerate(_label_order({k[0] for k in groups}))}
    out = []
    for label, pipe, task in sorted(groups, key=lambda k: (label_rank[k[0]], str(k[1]), task_rank.get(k[2], 99),
                                                           str(k[2]))):
        for r in sorted(_latest_per_seed(groups[(label, pipe, task)]), key=_seed_key):
            m = {k: v for k, v in (r.get("metrics") or {}).items() if v is not None and math.isfinite(v)}
            gap = m.get("forward_binary_gap")
            if gap is None and "forward_acc" in m and "binary_acc" in m:
                gap = m["forward_acc"] - m["binary_acc"]
            pct = {k: 100.0 * m[k] if k in m else None for k in ("binary_acc", "forward_acc", "soft_fraction")}
            out.append({"label": _label(label, pipe, split), "task": task, "seed": r["seed"], "status": r["status"],
                        "binary": pct["binary_acc"], "forward": pct["forward_acc"],
                        "gap": None if gap is None else 100.0 * gap, "soft": pct["soft_fraction"],
                        "run_id": r.get("run_id")})
    return out


def honesty_table(rows: list[dict]) -> tuple[str, str]:
    """(markdown, csv) of the honesty table: one line per run (see the module docstring); the CSV adds run_id
    and keeps full precision."""
    lines = honesty_rows(rows)

    def fmt(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    body = [[h["label"], h["task"], "" if h["seed"] is None else str(h["seed"]), h["status"], fmt(h["binary"], ".2f"),
             fmt(h["forward"], ".2f"), fmt(h["gap"], "+.2f"), fmt(h["soft"], ".1f")] for h in lines]
    raw = [[h["label"], h["task"], "" if h["seed"] is None else h["seed"], h["status"],
            *["" if h[k] is None else round(h[k], 4) for k in ("binary", "forward", "gap", "soft")], h["run_id"] or ""]
           for h in lines]
    return _markdown(HONESTY_HEADER, body, left=4), _csv(HONESTY_HEADER + ["run_id"], raw)


# -- files and MLflow --------------------------------------------------------------------------------------
@dataclass
class ReportFiles:
    """What a report wrote, and the MLflow run it was logged to (None: not logged)."""

    markdown: Path
    csv: Path
    honesty_csv: Path
    figure: Path | None = None
    run_id: str | None = None

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.markdown, self.csv, self.honesty_csv, self.figure) if p is not None]


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


HONESTY_NOTE = ("binary = honest binarized accuracy, forward = the training forward on the same test images, "
                "gap = forward - binary in points, soft fraction = share of binarized weights more than 1% of s "
                "away from +-s; last logged epoch of each run.")


def write_tables(rows: list[dict], out_dir: str | Path, stem: str, *, title: str, note: str = "",
                 metric: str = "binary_acc", transpose: bool = False, figure: bool | str | Path = True,
                 extra_markdown: str = "", variants=(), tasks=()) -> ReportFiles:
    """Write `<stem>.md` (both tables, `note`, `extra_markdown`), `<stem>.csv` (accuracy), `<stem>-honesty.csv`
    and, unless `figure` is False, the figure (`<stem>.png`, or the path `figure` names) into `out_dir`.
    Each file is replaced atomically, so a study that crashes keeps its last complete tables. `variants` and
    `tasks`: rows and columns shown even before any of their runs is in `rows` (see `grid`)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = table(rows, transpose, variants=variants, tasks=tasks)
    honesty_md, honesty_csv = honesty_table(rows)
    files = ReportFiles(out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}-honesty.csv")
    text = (f"# {title}\n\n{md}\n{note}\n\n## Honesty: forward/binary gap and soft fraction\n\n{honesty_md}\n"
            f"{HONESTY_NOTE}\n" + (f"\n{extra_markdown}\n" if extra_markdown else ""))
    write_atomic(files.markdown, text)
    write_atomic(files.csv, csv_text)
    write_atomic(files.honesty_csv, honesty_csv)
    if figure is not False and rows:
        from pipelines.report_figure import draw

        path = out / f"{stem}.png" if figure is True else Path(figure).expanduser()
        files.figure = draw(grid(rows, transpose, variants=variants, tasks=tasks), path, title=title, metric=metric)
    return files


def _report_run(client, experiment_id: str, key: str) -> str:
    """The run tagged `pcpp.report` = key (the newest one not deleted), created when there is none."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    found = client.search_runs([experiment_id], filter_string=f"tags.`{REPORT_TAG}` = '{key}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, tags={REPORT_TAG: key, MLFLOW_RUN_NAME: "report"}).info.run_id


def report_key(metric: str, filter_tags: dict | None) -> str:
    """What identifies a report run: the metric and the tag filter, e.g. `binary_acc pcpp.pipeline=ft`."""
    return " ".join([metric, *(f"{k}={v}" for k, v in sorted((filter_tags or {}).items()))]).replace("'", "")


def log_report(tracking_uri: str, experiment: str, files: ReportFiles, rows: list[dict], *, key: str,
               run_id: str | None = None) -> str:
    """Log the report's files under `report/` of the run chosen as the module docstring says; returns its id.
    A report run of our own is ended FINISHED; a parent run's status is left as it is."""
    from stages.tracking import Run, run_state
    from stages.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    own = False
    if run_id is not None:
        if run_state(client, run_id) != "active":
            raise ValueError(f"cannot log the report to MLflow run {run_id!r}: it is {run_state(client, run_id)} "
                             f"in {tracking_uri}")
    else:
        parents = {r.get("parent_run_id") for r in rows}
        parent = next(iter(parents)) if len(parents) == 1 else None
        if parent is not None and run_state(client, parent) == "active":
            run_id = parent
        else:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise ValueError(f"no MLflow experiment {experiment!r} in {tracking_uri} to log the report to")
            run_id, own = _report_run(client, exp.experiment_id, key), True
    run = Run(tracking_uri, run_id)
    run.log_files(files.paths, artifact_path="report")
    if own:
        run.finish("FINISHED")
    files.run_id = run_id
    return run_id


def make_report(tracking_uri: str, out_dir: str | Path, experiment: str = "pcpp", *, metric: str = "binary_acc",
                filter_tags: dict | None = None, figure: bool | str | Path = True, log: bool = True,
                log_run_id: str | None = None, transpose: bool = False) -> ReportFiles:
    """Collect, tabulate, draw and write `<out_dir>/<experiment>-<metric>.md`, `.csv`, `-honesty.csv` and `.png`
    (or the `figure` path; False: none), then log them to MLflow (`log`; `log_run_id` picks the run)."""
    rows = collect(tracking_uri, experiment, metric=metric, filter_tags=filter_tags)
    seeds = sorted({r["seed"] for r in rows if isinstance(r["seed"], int)})
    note = (f"{metric} in % at the last logged epoch, mean ± sample std over seeds {seeds} where a cell has "
            f"several runs; {len(rows)} runs of experiment `{experiment}`"
            + (f" with tags {filter_tags}" if filter_tags else "") + ".")
    files = write_tables(rows, out_dir, f"{experiment}-{metric}", title=f"{experiment}: {metric}", note=note,
                         metric=metric, transpose=transpose, figure=figure)
    if log and rows:
        log_report(tracking_uri, experiment, files, rows, key=report_key(metric, filter_tags), run_id=log_run_id)
    return files


def write_report(tracking_uri: str, out_dir: str | Path, experiment: str = "pcpp", *, metric: str = "binary_acc",
                 filter_tags: dict | None = None, **options) -> tuple[Path, Path]:
    """make_report, returning only (markdown, csv) paths (the older interface `pcpp report` calls)."""
    files = make_report(tracking_uri, out_dir, experiment, metric=metric, filter_tags=filter_tags, **options)
    return files.markdown, files.csv
