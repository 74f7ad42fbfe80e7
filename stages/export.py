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
    """The export stage's config: how many test samples the reloaded model is scored on (None: all), and
    the precision the kept full-precision tensors are stored in (pcpp.export.PRECISIONS: fp32, the
    default and bit-exact, fp16 or bf16 at half the bytes; see pcpp.export for the round trip's bound)."""

    eval_limit: int | None = None
    precision: str = "fp32"

    def __post_init__(self):
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or null, got {self.eval_limit}")
        pexport.check_precision(self.precision)


def run(cfg: ExportConfig, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    """Inputs `train` (the binarized model) and `data`; writes model.safetensors, model.json, size_summary.txt.

    The reloaded file's logits must equal the binarized-eval model's (fp32), or lie within
    pcpp.export.round_trip_tolerance of them (fp16 / bf16, BW); with binarized activations at fp16 / bf16 no
    logit bound holds, and the stage reports the binarized-eval accuracy beside the reloaded one instead.
    """
    from stages.data import eval_loader

    model = load_model(inputs["train"])
    model_name = model.pcpp_recipe["name"]
    summary = pexport.save(model, out / "model.safetensors", precision=cfg.precision)
    (out / "size_summary.txt").write_text(str(summary) + "\n")

    _, test_dir = shard_dirs(inputs["data"])
    x, _ = next(iter(eval_loader(test_dir, model_name, batch_size=ROUND_TRIP_BATCH)))
    with binary_eval(model), torch.no_grad():
        expected = model(x)
    reloaded = pexport.load(out / "model.safetensors")
    with torch.no_grad():
        got = reloaded(x)
    error = pexport.round_trip_error(got, expected)
    bound = pexport.round_trip_tolerance(model, cfg.precision)
    if bound is not None and not error <= bound:  # `not <=`: a NaN fails too
        within = "equal them" if bound == 0 else f"lie within {bound:g} of them (relative to the largest logit)"
        raise ValueError(f"export round trip failed ({cfg.precision}): reloaded logits differ by {error:.3g} "
                         f"(largest difference / largest logit) from the binarized-eval model's; they must {within}")
    metrics = {"file_bytes": summary.file_bytes, "ideal_bytes": summary.ideal_bytes, "fp32_bytes": summary.fp32_bytes,
               "ideal_bytes_kept_fp32": summary.ideal_bytes_kept_fp32, "ratio_to_fp32": summary.ratio,
               "binary_params": summary.binary_params, "fp_params": summary.fp_params,
               "round_trip_exact": float(torch.equal(got, expected)), "round_trip_error": error,
               "round_trip_same_top1": (got.argmax(1) == expected.argmax(1)).float().mean().item(),
               "reloaded_acc": accuracy(reloaded, eval_loader(test_dir, model_name, limit=cfg.eval_limit))}
    if cfg.precision != "fp32":  # what the rounding costs, on the same samples
        metrics["binary_acc"] = accuracy(model, eval_loader(test_dir, model_name, limit=cfg.eval_limit))
    log_to_run(ctx, metrics, files=[out / "model.safetensors", out / "model.json", out / "size_summary.txt"],
               params={"export.precision": cfg.precision, "export.eval_limit": cfg.eval_limit})
    return metrics
