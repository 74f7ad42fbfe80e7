"""Figures in the manner of the paper's Figures 1 and 5: F, B and P of a pair side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcpp.theory import Verdict


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
