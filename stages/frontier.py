"""Frontier stage: the accuracy-versus-size frontier of sensitivity-guided mixed binarization.

The train stage's recipe is trained once per point, each point a keep_fp policy over the sensitivity scan:
`{from_sensitivity: K}` for every K of `keep` (K = 0, the fully binarized model, always), then
`{budget_bytes: N}` / `{budget_ratio: R}` for every budget. Each point is resolved to blocks
(pcpp.mixed.resolve, priced at the export's precision), then trained and exported as a `train` and an
`export` stage (stages.execute.run_stage: same configs, same stage keys, same cache as the pipeline's own),
so adding a K reruns only that point, and the point whose blocks are the pipeline's own (K = 0 when
binarize.keep_fp is empty) is the train and export stages' artifact. Points that choose the same blocks are
trained once.

Inputs: data, teacher (the full-precision end point: its accuracy, its fp32 size), sensitivity (the CSV
that ranks the blocks), train (ordering, see above), pretrain and export when enabled. Writes
`frontier.csv` (one row per point, the fp32 end point first), `frontier.png` (stages.plots.frontier) and
`points.json` (each point's keep_fp decision: policy, ranking, kept blocks, priced sizes), logs them to the
stage's MLflow run (the runner logs them to the pipeline's parent run too, under `frontier/`).
Accuracies are fractions in [0, 1], measured on the same test images (the pipeline's data.eval_limit): the
teacher's for fp32, the exported file's (`reloaded_acc`: the honest binarized network, reloaded) for points.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from pcpp.surgery import RANKINGS, check_keep_fp, is_keep_fp_policy
from stages.artifact import Artifact, StageContext
from stages.config import TrainConfig
from stages.export import ExportConfig

CSV_NAME = "frontier.csv"
PNG_NAME = "frontier.png"
POINTS_NAME = "points.json"  # each point's keep_fp decision (pcpp.mixed.KeepDecision.to_dict), by label
COLUMNS = ("point", "kind", "policy", "kept_blocks", "blocks", "file_bytes", "predicted_bytes", "ratio_to_fp32",
           "accuracy", "train_binary_acc", "train_artifact", "export_artifact")

__all__ = ["CSV_NAME", "COLUMNS", "PNG_NAME", "POINTS_NAME", "FrontierConfig", "run"]


@dataclass
class FrontierConfig:
    """The frontier's config: the train stage's recipe (`training`: the TrainConfig the train stage gets;
    patterns in its binarize.keep_fp stay kept at every point), the export stage's settings, and the points:
    `keep` (K values: the K most sensitive blocks), `budget_bytes` (file bytes), `budget_ratio` (times
    smaller than fp32), ranked `by` drop_ptb or drop_bat (default: drop_bat when the scan has it)."""

    training: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    keep: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget_bytes: list[int] = field(default_factory=list)
    budget_ratio: list[float] = field(default_factory=list)
    by: str | None = None

    def __post_init__(self):
        if self.by is not None and self.by not in RANKINGS:
            raise ValueError(f"unknown frontier.by {self.by!r}; valid: {', '.join(RANKINGS)}")
        for key in ("keep", "budget_bytes", "budget_ratio"):
            if isinstance(getattr(self, key), (int, float)):  # one value: a one-point list
                setattr(self, key, [getattr(self, key)])
        for label, policy in self.points():
            try:
                check_keep_fp(policy)
            except ValueError as e:  # named by its key: frontier.keep, frontier.budget_bytes, ...
                key = {"K": "keep"}.get(label.split("=")[0], label.split("=")[0])
                raise ValueError(f"frontier.{key} point {label}: {e}") from None

    def points(self) -> list[tuple[str, dict]]:
        """(label, keep_fp policy) of every point, in order: K = 0 (the fully binarized end point), the other
        K values ascending, then the byte budgets and the ratio budgets as given; repeated values once."""
        out = {"K=0": {"from_sensitivity": 0}}
        for k in sorted(set(self.keep)):
            out.setdefault(f"K={k}", {"from_sensitivity": k})
        for v in self.budget_bytes:
            out.setdefault(f"budget_bytes={v}", {"budget_bytes": v})
        for v in self.budget_ratio:
            out.setdefault(f"budget_ratio={v:g}", {"budget_ratio": v})
        extra = {"precision": self.export.precision, **({"by": self.by} if self.by else {})}
        return [(label, {**policy, **extra}) for label, policy in out.items()]


def _slug(label: str) -> str:
    return label.replace("K=", "k").replace("=", "_")


def _fp_row(teacher: Artifact, n_blocks: int, fp32_bytes: int) -> dict:
    return {"point": "fp32", "kind": "fp", "policy": "", "kept_blocks": n_blocks, "blocks": "all",
            "file_bytes": fp32_bytes, "predicted_bytes": "", "ratio_to_fp32": 1.0,
            "accuracy": teacher.metrics.get("accuracy", ""), "train_binary_acc": "", "train_artifact": "",
            "export_artifact": ""}


def run(cfg: FrontierConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """Train and export every point (cached as train / export stages), then the CSV and the plot."""
    from pcpp.export import size_summary
    from stages.common import shard_dirs
    from stages.data import load_manifest
    from stages.execute import nested, run_stage
    from stages.mixed import meta_model, with_keep_fp
    from stages.plots import frontier as plot_frontier
    from stages.tracking import log_to_run

    missing = [k for k in ("data", "teacher", "sensitivity") if k not in inputs]
    if missing:
        raise ValueError(f"the frontier needs the data, teacher and sensitivity artifacts; missing: "
                         f"{', '.join(missing)} (enable the sensitivity stage)")
    spec = cfg.training.binarize
    if spec is None or is_keep_fp_policy(spec.keep_fp):  # pipelines.config refuses both at load
        raise ValueError(f"the frontier sets keep_fp per point of the train stage's binarized recipe; its "
                         f"binarize.keep_fp must be patterns (kept at every point) or empty, got "
                         f"{None if spec is None else spec.keep_fp}")
    base = list(cfg.training.binarize.keep_fp)
    train_inputs = {k: inputs[k] for k in ("data", "teacher", "pretrain") if k in inputs}  # the train stage's
    point_ctx = nested(ctx)  # the points' stages nest under the frontier's MLflow run; their trainings too
    decisions = [(label, policy, _decide(cfg, inputs, label, policy))
                 for label, policy in cfg.points()]  # every point resolved (and refused) before any training
    fp32_bytes = size_summary(meta_model(cfg.training.model)).fp32_bytes
    rows = [_fp_row(inputs["teacher"], len(decisions[0][2].ranking), fp32_bytes)]
    done: dict[tuple, tuple[str, Artifact, Artifact]] = {}  # blocks -> the first point that kept them, its stages
    for label, policy, decision in decisions:
        blocks = tuple(decision.blocks)
        print(f"frontier point {label}: {decision.describe()}"
              + (f", the blocks of {done[blocks][0]}: trained once" if blocks in done else ""), flush=True)
        if blocks not in done:
            tags = {"pcpp.frontier.point": label, "pcpp.frontier.blocks": ",".join(blocks)}
            trained, _ = run_stage("train", with_keep_fp(cfg.training, base + list(blocks)), point_ctx, train_inputs,
                                   label=f"frontier {label} train", tags=tags)
            exported, _ = run_stage("export", cfg.export, point_ctx, {"data": inputs["data"], "train": trained},
                                    label=f"frontier {label} export", tags=tags)
            done[blocks] = label, trained, exported
        _, trained, exported = done[blocks]
        m = exported.metrics
        rows.append({"point": label, "kind": "binary", "policy": json.dumps(policy), "kept_blocks": len(blocks),
                     "blocks": ";".join(blocks), "file_bytes": m["file_bytes"],
                     "predicted_bytes": decision.predicted_bytes, "ratio_to_fp32": m["ratio_to_fp32"],
                     "accuracy": m["reloaded_acc"], "train_binary_acc": trained.metrics.get("binary_acc", ""),
                     "train_artifact": trained.path.name, "export_artifact": exported.path.name})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    t = cfg.training
    task = t.binarize.task
    tested = load_manifest(shard_dirs(inputs["data"])[1])["num_samples"]
    tested = min(tested, cfg.export.eval_limit or tested)  # the images every accuracy of the plot is on
    title = (f"{t.model.name} {task} ({_qname(t.binarize.weight)}), {t.optim.epochs} epoch(s) per point, export "
             f"{cfg.export.precision}, {tested:,} test images\nK most sensitive blocks kept in full precision "
             f"(ranked by {decisions[0][2].by})")
    plot_frontier(rows, out / PNG_NAME, title=title)
    # a point's train artifact records the blocks it was trained with (shared by the points that keep them);
    # the policy, the ranking and the sizes priced for each point are here
    (out / POINTS_NAME).write_text(json.dumps({label: d.to_dict() for label, _, d in decisions}, indent=1))
    for r in rows:  # the table in the console too (fp32: the teacher's accuracy; points: the exported file's)
        acc = f"{float(r['accuracy']):.4f}" if r["accuracy"] != "" else "n/a"
        kept = f", kept {r['blocks'].replace(';', ', ')}" if r["kind"] == "binary" and r["blocks"] else ""
        print(f"frontier {r['point']}: {int(r['file_bytes']):,} bytes ({float(r['ratio_to_fp32']):.1f}x smaller), "
              f"honest accuracy {acc}{kept}", flush=True)
    metrics = {"points": len(rows) - 1, "fp_accuracy": rows[0]["accuracy"], "fp_bytes": fp32_bytes,
               "binary_accuracy": rows[1]["accuracy"], "binary_bytes": rows[1]["file_bytes"]}
    for r in rows[1:]:
        metrics[f"accuracy.{_slug(r['point'])}"] = r["accuracy"]
        metrics[f"file_bytes.{_slug(r['point'])}"] = r["file_bytes"]
    log_to_run(ctx, files=[out / CSV_NAME, out / PNG_NAME, out / POINTS_NAME])
    return metrics


def _decide(cfg: FrontierConfig, inputs: dict[str, Artifact], label: str, policy: dict):
    """stages.mixed.decide for one point; its refusal names the point (pipelines.config checks most before)."""
    from stages.mixed import decide

    try:
        return decide(cfg.training, inputs, policy, cfg.export.precision)
    except ValueError as e:
        raise ValueError(f"frontier point {label}: {e}") from None


def _qname(spec) -> str:
    return spec if isinstance(spec, str) else spec.get("name", "?") if isinstance(spec, dict) else "none"
