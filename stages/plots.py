"""Figures, outside the pure-torch library: the pairs' F, B and P side by side (the paper's Figures 1 and 5),
the sensitivity heatmap (Figure 3) and the accuracy-versus-size frontier of mixed binarization. Matplotlib
with the Agg backend: files only, no display.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pcpp.sensitivity import TRANSFORMER_PARTS
from pcpp.theory import Verdict

__all__ = ["frontier", "heatmap", "plot_verdicts"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write and close `fig`; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def plot_verdicts(verdicts: list[Verdict], path: str | Path, title: str | None = None) -> Path:
    """One row per verdict: forward F, backward B, and P = int dF/B (T o P overlaid when admissible)."""
    plt = _pyplot()
    path = Path(path)
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise ValueError(f"plot file must end in .png, .pdf or .svg, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(verdicts), 3, figsize=(11, 2.9 * len(verdicts)), squeeze=False)
    for row, v in zip(axes, verdicts):
        params = ", ".join(f"{k}={x:g}" for k, x in v.params.items())
        label = f"{v.name}" + (f" ({params})" if params else "")
        _step(row[0], v.w, v.F, "tab:red")
        row[0].set_title(f"{label}: forward F")
        row[1].plot(v.w, v.B, color="tab:blue")
        row[1].set_title("backward B")
        if v.admissible:
            row[2].plot(v.w, v.P_values, color="tab:green", label="P")
            row[2].plot(v.w, v.T(v.P_values), color="tab:red", ls="--", lw=1, label="T o P = F")
            row[2].legend(loc="upper left", fontsize=8)
            row[2].set_title("proximal map P = int dF/B")
        else:
            row[2].text(0.5, 0.5, "not admissible:\n" + _wrap(v.reason), ha="center", va="center",
                        fontsize=8, transform=row[2].transAxes, wrap=True)
            row[2].set_title("P: none (Corollary 1 fails)")
        for ax in row:
            ax.axhline(0, color="0.8", lw=0.5)
            ax.axvline(0, color="0.8", lw=0.5)
            ax.set_xlabel("w")
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=110)


def _step(ax, w, f, color):
    """Plot F without drawing its jumps as steep lines."""
    jumps = np.flatnonzero(np.abs(np.diff(f)) > 0.5)
    for seg in np.split(np.arange(len(w)), jumps + 1):
        ax.plot(w[seg], f[seg], color=color)


def _wrap(text: str, width: int = 38) -> str:
    out, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(out + [line])


# -- Figure 3: sensitivity heatmap ----------------------------------------------------------------------
def _layout(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """(row labels, column labels, block -> cell) in the manner of Figure 3.

    Transformers: an attn row and an mlp row, one column per block. Staged CNNs (`layer2.1`): one row
    per stage, one column per block index. Anything else: one row.
    """
    parts = [n.rpartition(".") for n in names]
    if all(p[0] and p[2] in TRANSFORMER_PARTS for p in parts):
        prefixes = list(dict.fromkeys(p[0] for p in parts))
        cols = [re.sub(r"\b(?:layers|blocks|stages)\.", "", p) or p for p in prefixes]
        return list(TRANSFORMER_PARTS), cols, {
            n: (TRANSFORMER_PARTS.index(p[2]), prefixes.index(p[0])) for n, p in zip(names, parts)}
    if all(p[0] and p[2].isdigit() for p in parts):
        stages = list(dict.fromkeys(p[0] for p in parts))
        width = max(int(p[2]) for p in parts) + 1
        return stages, [str(i) for i in range(width)], {
            n: (stages.index(p[0]), int(p[2])) for n, p in zip(names, parts)}
    return [""], names, {n: (0, i) for i, n in enumerate(names)}


def heatmap(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Figure 3: accuracy drop per block (points) as a colour map, warmer = larger drop, values annotated.

    One panel for PTB and, when the rows have them, one for BAT.
    """
    plt = _pyplot()
    if not rows:
        raise ValueError("no rows to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r["block"] for r in rows]
    row_labels, col_labels, cells = _layout(names)
    panels = [("drop_ptb", "PTB")] + ([("drop_bat", "BAT")] if "drop_bat" in rows[0] else [])

    fig_w = min(max(6.5, 2.5 + 0.75 * len(col_labels)), 24)
    fig_h = 0.9 + len(panels) * (0.55 * len(row_labels) + 0.9)
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, fig_h), squeeze=False)
    cmap = plt.get_cmap("YlOrRd").with_extremes(bad="0.92")
    for ax, (key, label) in zip(axes[:, 0], panels):
        grid = np.full((len(row_labels), len(col_labels)), np.nan)
        for r in rows:
            grid[cells[r["block"]]] = 100.0 * r[key]
        finite = grid[np.isfinite(grid)]
        vmin, vmax = min(0.0, float(finite.min())), max(float(finite.max()), 1e-6)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = (v - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=0 if len(col_labels) < 16 else 90, fontsize=8)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=9)
        ax.set_xlabel("block" if row_labels[0] in TRANSFORMER_PARTS or len(row_labels) == 1 else "block in stage")
        ax.set_title(f"{label}: accuracy drop when only that block is binarized", fontsize=10)
        fig.colorbar(image, ax=ax, label="drop (points)", fraction=0.04, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# -- mixed binarization: accuracy against exported size ---------------------------------------------------
def frontier(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Honest accuracy (%) against exported file size (bytes, log scale) of the frontier's points.

    rows: dicts with `point` (a label), `kind` ("fp" for the full-precision end point, else "binary"),
    `file_bytes` and `accuracy` (a fraction). The binarized points are joined in order of size and
    labelled; points of equal size and accuracy (two policies that chose the same blocks) share one marker
    and one label. ValueError without rows.
    """
    plt = _pyplot()
    if not rows:
        raise ValueError("no frontier points to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[tuple, dict] = {}
    for r in rows:
        at = (r["kind"], int(r["file_bytes"]), float(r["accuracy"]))
        merged.setdefault(at, {**r, "labels": []})["labels"].append(str(r["point"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    binary = sorted((m for m in merged.values() if m["kind"] != "fp"), key=lambda m: int(m["file_bytes"]))
    fp = [m for m in merged.values() if m["kind"] == "fp"]
    if binary:
        ax.plot([int(m["file_bytes"]) for m in binary], [100 * float(m["accuracy"]) for m in binary], "o-",
                color="tab:blue", label="binarized, most sensitive blocks kept in full precision")
    for m in fp:
        ax.plot(int(m["file_bytes"]), 100 * float(m["accuracy"]), "*", ms=14, color="tab:red",
                label="full precision (fp32)")
    for m in [*binary, *fp]:  # the fp point sits at the right edge: its label goes to its left
        left = m["kind"] == "fp"
        ax.annotate(", ".join(m["labels"]), (int(m["file_bytes"]), 100 * float(m["accuracy"])),
                    textcoords="offset points", xytext=(-8 if left else 6, -13), ha="right" if left else "left",
                    fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel("exported file size (bytes, log scale)")
    ax.set_ylabel("honest accuracy (%)")
    ax.grid(True, which="both", color="0.9", lw=0.6)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
