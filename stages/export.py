"""Export stage: bit-packed export with round-trip verification and the size summary, logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import torch

from pcpp import export as pexport
from pcpp.nn import binary_eval
from stages.artifact import Artifact, StageContext
from stages.common import accuracy, load_model, log_to_run, shard_dirs


def run(cfg: dict, inputs: dict[str, Artifact], out: Path, ctx: StageContext) -> dict:
    model = load_model(inputs["train"])
    recipe_name = model.pcpp_recipe["name"]
    summary = pexport.save(model, out / "model.safetensors")
    (out / "size_summary.txt").write_text(str(summary) + "\n")

    # Round trip: the reloaded file must give the binarized-eval model's logits exactly.
    _, test_dir = shard_dirs(inputs["data"])
    from pcpp import models
    from stages.data import make_loader

    norm = models.normalization(recipe_name)
    x, _ = next(iter(make_loader(test_dir, train=False, batch_size=64, mean=norm.mean, std=norm.std)))
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
               "reloaded_acc": accuracy(reloaded, test_dir, recipe_name, limit=cfg.get("eval_limit"))}
    log_to_run(ctx, metrics, files=[out / "model.safetensors", out / "model.json", out / "size_summary.txt"])
    return metrics
