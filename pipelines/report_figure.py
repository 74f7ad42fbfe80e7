"""The comparison table of pipelines.report as a figure: a heatmap of a `Grid` with each cell's value written in.

Colour = the cell's mean in % (colour bar beside it, on the range of the values shown), text = what the table
says (`mean ± std`, and `(k/n diverged)` when some seeds diverged); cells without a run are grey with `n/a`,
cells whose every run diverged hatched with `diverged`. The layout is fixed in inches (no tight bounding box),
so the PNG's size follows from the table's shape alone: `figure_pixels(rows, columns)`. Matplotlib with the
Agg backend: files only, no display.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

DPI = 100
# inches: row labels on the left, each cell, colour bar on the right, title (two lines at most, then the
# metric line) on top, axis label + legend below; the cell area is at least MIN_W x MIN_H, so that a small
# table still has room for its title and colour bar label (its cells are then larger)
LEFT, CELL_W, RIGHT, MIN_W = 1.5, 1.25, 1.45, 4.0
TOP, CELL_H, BOTTOM, MIN_H = 1.0, 0.5, 1.0, 1.8
TITLE_CHARS_PER_INCH = 12  # at 11 pt
NA_COLOUR, DIVERGED_COLOUR = "0.82", "#f4c7c3"
METRIC_NAMES = {"binary_acc": "honest binary accuracy", "forward_acc": "training-forward accuracy"}


def _area(n_rows: int, n_cols: int) -> tuple[float, float]:
    """(width, height) in inches of the cell area."""
    return max(CELL_W * max(n_cols, 1), MIN_W), max(CELL_H * max(n_rows, 1), MIN_H)


def figure_inches(n_rows: int, n_cols: int) -> tuple[float, float]:
    """(width, height) in inches of the figure of a table with `n_rows` x `n_cols` cells."""
    w, h = _area(n_rows, n_cols)
    return LEFT + w + RIGHT, TOP + h + BOTTOM


def figure_pixels(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `draw` writes for that table shape."""
    w, h = figure_inches(n_rows, n_cols)
    return round(w * DPI), round(h * DPI)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _range(values: list[float]) -> tuple[float, float]:
    """The colour range: the values' range widened to whole points, at least 2 points wide."""
    if not values:
        return 0.0, 100.0
    lo, hi = math.floor(min(values)), math.ceil(max(values))
    if hi - lo < 2:
        lo, hi = lo - 1, hi + 1
    return float(lo), float(hi)


def draw(grid, path: str | Path, *, title: str, metric: str = "binary_acc") -> Path:
    """Draw `grid` (pipelines.report.Grid) into `path` (.png, .pdf or .svg); returns the path.

    The file is written through a temporary name and a rename, so a reader never sees half a PNG.
    """
    path = Path(path)
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise ValueError(f"figure file must end in .png, .pdf or .svg, got {path.name!r}")
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    n_rows, n_cols = len(grid.rows), len(grid.columns)
    width, height = figure_inches(n_rows, n_cols)
    area_w, area_h = _area(n_rows, n_cols)
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((LEFT / width, BOTTOM / height, area_w / width, area_h / height))
    cax = fig.add_axes(((LEFT + area_w + 0.25) / width, BOTTOM / height, 0.18 / width, area_h / height))

    values = [c.mean for c in grid.cells.values() if c.mean is not None]
    lo, hi = _range(values)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(lo, hi)
    for i, row in enumerate(grid.rows):
        for j, column in enumerate(grid.columns):
            cell = grid.cell(row, column)
            if cell.state == "value":
                colour = cmap(norm(cell.mean))
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor=colour, edgecolor="white", lw=2))
                r, g, b, _ = colour
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                main = cell.text.split(" (")[0]
                extra = f"{cell.diverged}/{cell.runs} diverged" if cell.diverged else (
                    f"{len(cell.values)} seeds" if len(cell.values) > 1 else "")
                ax.annotate(main, (j + 0.5, i + 0.5), xytext=(0, 5 if extra else 0), textcoords="offset points",
                            ha="center", va="center", fontsize=10, color=ink)
                if extra:
                    ax.annotate(extra, (j + 0.5, i + 0.5), xytext=(0, -8), textcoords="offset points", ha="center",
                                va="center", fontsize=7.5, color=ink)
            elif cell.state == "diverged":
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor=DIVERGED_COLOUR, edgecolor="white", lw=2,
                                       hatch="///"))
                ax.text(j + 0.5, i + 0.5, "diverged", ha="center", va="center", fontsize=10, color="darkred")
            else:  # n/a, or refused (the activation guard's, before training)
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor=NA_COLOUR, edgecolor="white", lw=2))
                ax.text(j + 0.5, i + 0.5, cell.state, ha="center", va="center", fontsize=10, color="0.35")
    ax.set_xlim(0, max(n_cols, 1))
    ax.set_ylim(max(n_rows, 1), 0)  # first row on top, as in the table
    ax.set_xticks([j + 0.5 for j in range(n_cols)], grid.columns)
    ax.set_yticks([i + 0.5 for i in range(n_rows)], grid.rows)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel(grid.column_title)
    ax.set_ylabel(grid.row_title)

    label = f"{METRIC_NAMES.get(metric, metric)} (%)"
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label(label)
    lines = textwrap.wrap(title, width=int(width * TITLE_CHARS_PER_INCH))
    if len(lines) > 2:
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), int(width * TITLE_CHARS_PER_INCH))]
    fig.suptitle("\n".join([*lines, f"{label} at the last epoch, mean ± std over seeds"]), y=1 - 0.1 / height,
                 va="top", fontsize=11)
    fig.legend(handles=[Patch(facecolor=NA_COLOUR, label="n/a: no run"),
                        Patch(facecolor=DIVERGED_COLOUR, hatch="///", label="diverged: every run")],
               loc="lower center", ncol=2, frameon=False, fontsize=8.5, bbox_to_anchor=(0.5, 0.02))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    os.replace(tmp, path)
    return path
