"""Export stage: bit-packed export with round-trip verification and the size summary, logged to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pcpp import export as pexport
from pcpp.evaluation import accuracy
from pcpp.layers import binary_eval
from stages.artifact import Artifact, StageContext
from stages.common import load_model, log_to_run, shard_dirs

ROUND_TRIP_BATCH = 64  # test images the reloaded model's logits are compared on


@dataclass
class ExportConfig:
    """The export stage's config: how many test samples the reloaded model is scored on (None: all)."""

    eval_limit: int | None = None

    def __post_init__(self):
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or null, got {self.eval_limit}")


def run(cfg: ExportConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """Inputs `train` (the binarized model) and `data`; writes model.safetensors, model.json, size_summary.txt."""
    from stages.data import eval_loader

    model = load_model(inputs["train"])
    model_name = model.pcpp_recipe["name"]
    summary = pexport.save(model, out / "model.safetensors")
    (out / "size_summary.txt").write_text(str(summary) + "\n")

    # Round trip: the reloaded file must give the binarized-eval model's logits exactly.
    _, test_dir = shard_dirs(inputs["data"])
    x, _ = next(iter(eval_loader(test_dir, model_name, batch_size=ROUND_TRIP_BATCH)))
    with binary_eval(model), torch.no_grad():
        expected = model(x)
    reloaded = pexport.load(out / "model.safetensors")
    with torch.no_grad():
        got = reloaded(x)
    if not torch.equal(got, expected):
        raise ValueError(f"export round trip failed: reloaded logits differ by up to "
                         f"{(got - expected).abs().max().item():.3g} from the binarized-eval model")
    metrics = {"file_bytes": summary.file_bytes, "ideal_bytes": summary.ideal_bytes, "fp32_bytes": summary.fp32_bytes,
               "ratio_to_fp32": summary.ratio, "binary_params": summary.binary_params,
               "fp_params": summary.fp_params, "round_trip_exact": 1.0,
               "reloaded_acc": accuracy(reloaded, eval_loader(test_dir, model_name, limit=cfg.eval_limit))}
    log_to_run(ctx, metrics, files=[out / "model.safetensors", out / "model.json", out / "size_summary.txt"])
    return metrics
