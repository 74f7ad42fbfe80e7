"""Export stage: bit-packed export with round-trip verification and the size summary, logged to MLflow."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pcpp import export as pexport
from pcpp.evaluation import accuracy
from pcpp.layers import binary_eval
from pcpp.mixed import predict_file_bytes
from stages.artifact import Artifact, StageContext
from stages.common import load_model, log_to_run, shard_dirs
from stages.mixed import KEEP_FP_FILE

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

    Metrics: the file's size (file_bytes, ratio_to_fp32, ...), predicted_bytes (pcpp.mixed.predict_file_bytes,
    what keep_fp budgets are priced with) and size_vs_prediction (file / predicted - 1), the round trip, the
    reloaded accuracy; with a train artifact that kept blocks in full precision (keep_fp.json), their number
    and names (keep_fp_count, keep_fp_blocks; params keep_fp.blocks, keep_fp.policy).

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
    reloaded, got, expected, error = round_trip(model, out / "model.safetensors", x, cfg.precision)
    metrics = {"file_bytes": summary.file_bytes, "ideal_bytes": summary.ideal_bytes, "fp32_bytes": summary.fp32_bytes,
               "ideal_bytes_kept_fp32": summary.ideal_bytes_kept_fp32, "ratio_to_fp32": summary.ratio,
               "binary_params": summary.binary_params, "fp_params": summary.fp_params,
               "round_trip_exact": float(torch.equal(got, expected)), "round_trip_error": error,
               "round_trip_same_top1": (got.argmax(1) == expected.argmax(1)).float().mean().item(),
               "reloaded_acc": accuracy(reloaded, eval_loader(test_dir, model_name, limit=cfg.eval_limit))}
    if cfg.precision != "fp32":  # what the rounding costs, on the same samples
        metrics["binary_acc"] = accuracy(model, eval_loader(test_dir, model_name, limit=cfg.eval_limit))
    # the size pcpp.mixed predicts for this model (what a keep_fp budget is priced with) against the file's
    metrics["predicted_bytes"] = predict_file_bytes(model, cfg.precision)
    metrics["size_vs_prediction"] = summary.file_bytes / metrics["predicted_bytes"] - 1.0
    params = {"export.precision": cfg.precision, "export.eval_limit": cfg.eval_limit}
    if KEEP_FP_FILE in inputs["train"].manifest["files"]:  # mixed binarization: which blocks the file keeps
        kept = json.loads(inputs["train"].file(KEEP_FP_FILE).read_text())
        metrics.update(keep_fp_count=len(kept["blocks"]), keep_fp_blocks=",".join(kept["blocks"]))
        params.update({"keep_fp.blocks": ",".join(kept["blocks"]), "keep_fp.policy": json.dumps(kept["policy"])})
    log_to_run(ctx, metrics, files=[out / "model.safetensors", out / "model.json", out / "size_summary.txt"],
               params=params)
    return metrics


def round_trip(model: torch.nn.Module, path: Path, x: torch.Tensor, precision: str):
    """Reload the export at `path` and compare its logits on `x` with the binarized-eval model's.

    Returns (reloaded model, its logits, the model's logits, the error of pcpp.export.round_trip_error).
    Raises ValueError when they differ beyond pcpp.export.round_trip_tolerance (exactly equal at fp32)."""
    with binary_eval(model), torch.no_grad():
        expected = model(x)
    reloaded = pexport.load(path)
    with torch.no_grad():
        got = reloaded(x)
    error = pexport.round_trip_error(got, expected)
    bound = pexport.round_trip_tolerance(model, precision)
    if bound is not None and not error <= bound:  # `not <=`: a NaN fails too
        within = "equal them" if bound == 0 else f"lie within {bound:g} of them (relative to the largest logit)"
        raise ValueError(f"export round trip failed ({precision}): reloaded logits differ by {error:.3g} "
                         f"(largest difference / largest logit) from the binarized-eval model's; they must {within}")
    return reloaded, got, expected, error


def export_run(run_dir: str | Path, out: str | Path, precision: str = "fp32", eval_limit: int | None = None) -> dict:
    """`pcpp export RUN_DIR OUT`: the 1-bit export of a `pcpp train` run's final network (its final/model.pt,
    rebuilt from its config.yaml), round trip verified on its test shards, scored there when they exist.

    Writes OUT (.safetensors) and its manifest (.json). Scores on the run's own test images (data.eval_limit)
    unless `eval_limit` is given. Returns {"summary": SizeSummary, "round_trip_error", "reloaded_acc" and
    "binary_acc" (the binarized-eval model's; equal at fp32; None without test shards), "images"}. Raises
    FileNotFoundError naming a missing file (or how the run ended without a network), ValueError for an OUT
    that is not .safetensors, a failed round trip or weights that do not fit the config."""
    from stages.config import load_config
    from stages.data import eval_loader
    from stages.training import model_recipe

    run_dir, out = Path(run_dir), Path(out)
    config, weights, ended = run_dir / "config.yaml", run_dir / "final" / "model.pt", run_dir / "result.json"
    if not weights.exists() and config.exists() and ended.exists():  # the run ended without a network
        outcome = json.loads(ended.read_text())
        raise FileNotFoundError(f"{run_dir} has no final network: the run ended {outcome.get('status')!r}: "
                                f"{outcome.get('message') or 'no message'}")
    for f, what in ((config, "the run's config"), (weights, "the final network (written when a run finishes)")):
        if not f.exists():
            raise FileNotFoundError(f"{f} does not exist: {what}; RUN_DIR is the run directory `pcpp train` "
                                    "printed (runs/train/<name>-<digest>)")
    if out.suffix != ".safetensors":
        raise ValueError(f"OUT must end in .safetensors (its manifest goes beside it as .json), got {out}")
    cfg = load_config(config)
    eval_limit = cfg.data.eval_limit if eval_limit is None else eval_limit  # the images the run scored
    from pcpp import models

    model = models.load(model_recipe(cfg), cfg.binarize, weights=weights).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = pexport.save(model, out, precision=precision)
    test_dir = Path(cfg.data.test) if cfg.data.test else None
    result = {"summary": summary, "round_trip_error": None, "reloaded_acc": None, "binary_acc": None, "images": 0,
              "test_dir": test_dir}
    if test_dir is None or not (test_dir / "manifest.json").exists():
        return result  # nothing to verify on: the caller says so
    x, _ = next(iter(eval_loader(test_dir, cfg.model.name, batch_size=ROUND_TRIP_BATCH)))
    reloaded, _, _, result["round_trip_error"] = round_trip(model, out, x, precision)
    available = json.loads((test_dir / "manifest.json").read_text())["num_samples"]
    result["images"] = min(eval_limit or available, available)
    result["reloaded_acc"] = accuracy(reloaded, eval_loader(test_dir, cfg.model.name, limit=eval_limit))
    # the honest network the run evaluated, on the same images: what the export must keep
    result["binary_acc"] = result["reloaded_acc"] if precision == "fp32" else accuracy(
        model, eval_loader(test_dir, cfg.model.name, limit=eval_limit))
    return result
