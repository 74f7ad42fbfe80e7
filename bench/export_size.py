"""Export size per precision of the kept tensors: ViT-B/16 BW (the paper's 450 MB -> 15 MB) by default.

Builds the timm model with random weights (what the size depends on is the shapes, not the values),
binarizes it with the default BW spec (first layer and head kept), saves it with the kept tensors in
fp32, fp16 and bf16, and prints one row per precision: the file size, the ideal size computed from the
shapes, the ratio to the fp32 model, and the round trip: round_trip_error of the reloaded model's logits
against binary_eval's on --batch random images, with the bound pcpp.export documents.
--table prints pcpp's per-layer size table for each precision as well.

PYTHONPATH=. .venv/bin/python bench/export_size.py [--model vit_base_patch16_224] [--batch 2] [--image-size 224]
    [--threads 1] [--table]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pcpp import export, models
from pcpp.layers import binary_eval
from pcpp.surgery import binarize_

PAPER_MB = 15  # ViT-B BW in the paper: 450 MB -> 15 MB


def measure(model_name: str, batch: int, image_size: int, table: bool) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = models.create(model_name)
    binarize_(model)  # BW, the default spec
    model.eval()
    size = (3, image_size, image_size)
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))
    with binary_eval(model), torch.no_grad():
        expected = model(x)
    print(f"{model_name} BW, built and evaluated in {time.perf_counter() - t0:.0f} s; batch {batch} of {tuple(size)}")
    head = (f"{'kept':>5}  {'file bytes':>12}  {'MiB':>7}  {'MB':>7}  {'ideal bytes':>12}  {'x fp32':>6}  "
            f"{'round trip':>10}  {'bound':>6}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        for precision in export.PRECISIONS:
            summary = export.save(model, path, precision=precision)
            with torch.no_grad():
                got = export.load(path)(x)
            bound = export.round_trip_tolerance(model, precision)
            err = export.round_trip_error(got, expected)
            bound = "none" if bound is None else "exact" if bound == 0 else f"{bound:.0e}"
            print(f"{precision:>5}  {summary.file_bytes:>12,}  {summary.file_bytes / 2**20:>7.2f}  "
                  f"{summary.file_bytes / 1e6:>7.2f}  {summary.ideal_bytes:>12,}  {summary.ratio:>6.1f}  "
                  f"{err:>10.2e}  {bound:>6}", flush=True)
            if table:
                print(summary)
    print(f"fp32 model: {summary.fp32_bytes / 1e6:.1f} MB ({summary.fp32_bytes / 2**20:.1f} MiB); "
          f"the paper: {PAPER_MB} MB for ViT-B BW")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="a timm or pcpp model name")
    p.add_argument("--batch", type=int, default=2, help="random images the round trip is measured on")
    p.add_argument("--image-size", type=int, default=224, help="side of the random images (32 for resnet20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--table", action="store_true", help="also print the per-layer size table per precision")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    measure(args.model, args.batch, args.image_size, args.table)


if __name__ == "__main__":
    main()
