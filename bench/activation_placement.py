"""Where should a binarized activation get its signed input? ResNet-20 BWA, one short FT per placement.

For each `activation_placement` (pcpp.placement: threshold, pre_relu, hardtanh, and none as the broken
baseline), fine-tunes the CIFAR-10 ResNet-20 teacher with bnn++ weights and bnn++ activations (BWA; BWAA
with --task BWAA) in a plain torch loop (no Ray): Adam lr 1e-3 cosine, batch 128, random crop + flip,
the pairs' schedules at step / total steps, thresholds calibrated at the channel median on 4 training
batches when the placement has them. Prints the honest binary accuracy (`binary_eval`) before and after
fine-tuning, the training-forward accuracy, and the balance of the binarized activations. Figures only.

    PYTHONPATH=. .venv/bin/python bench/activation_placement.py                 # 10k train, 2k test, 1 epoch
    PYTHONPATH=. .venv/bin/python bench/activation_placement.py --epochs 3 --task BWAA --placements threshold

Data: the JPEG tars of ../shared/data/cifar10-jpeg read directly (the first N/10 images of each class).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pcpp import layers as pnn  # noqa: E402
from pcpp import models, tasks  # noqa: E402
from pcpp.calibration import calibrate_thresholds_, check_activation_balance, thresholds_set_next  # noqa: E402
from pcpp.schedules import progress_at  # noqa: E402
from pcpp.surgery import binarize_  # noqa: E402

SHARED = REPO.parent / "shared"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_tar(path: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` JPEGs of each class folder of a CIFAR-10 tar, normalised for the teacher."""
    xs, ys, taken = [], [], dict.fromkeys(CLASSES, 0)
    with tarfile.open(path) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 2 or parts[-2] not in taken or taken[parts[-2]] >= per_class:
                continue
            taken[parts[-2]] += 1
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            xs.append(np.asarray(img, dtype=np.float32) / 255.0)
            ys.append(CLASSES.index(parts[-2]))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    norm = models.normalization("resnet20")
    x = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    return x, torch.tensor(ys)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2, n), generator=gen)
    rows = (i.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1)
    cols = (j.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def accuracy(model, x, y, honest: bool, batch: int = 500) -> float:
    correct = 0
    with pnn.evaluation(model, honest), torch.no_grad():
        for k in range(0, len(x), batch):
            correct += int((model(x[k:k + batch]).argmax(1) == y[k:k + batch]).sum())
    return correct / len(x)


def run(placement: str, args, train, test) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = models.create("resnet20", pretrained_file=args.teacher)
    spec = tasks.spec(args.task, args.weight, args.activation, activation_placement=placement)
    with thresholds_set_next():  # calibrated below
        binarize_(model, spec)
    xtr, ytr = train
    order = torch.randperm(len(xtr), generator=gen)
    calib = [xtr[order[k * args.batch:(k + 1) * args.batch]] for k in range(4)]
    calibrate_thresholds_(model, calib)  # a no-op for placements without thresholds
    balance = check_activation_balance(model, test[0][:500], strict=False)
    before = accuracy(model, *test, honest=True)

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = len(xtr) // args.batch
    total = steps_per_epoch * args.epochs
    step, t0 = 0, time.time()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * args.batch:(k + 1) * args.batch]
            for g in opt.param_groups:
                g["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
            pnn.set_progress(model, progress_at(step, total))
            loss = F.cross_entropy(model(augment(xtr[idx], gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    train_s = time.time() - t0
    after = accuracy(model, *test, honest=True)
    forward = accuracy(model, *test, honest=False)
    final = check_activation_balance(model, test[0][:500], strict=False)
    return {"placement": placement, "before": before, "binary": after, "forward": forward, "loss": float(loss.detach()),
            "refused_before": len(balance.refused), "below_min": min(r.below for r in final.rows),
            "below_max": max(r.below for r in final.rows), "train_s": train_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--placements", default="threshold,pre_relu,hardtanh,none")
    p.add_argument("--task", default=tasks.BWA, choices=(tasks.BWA, tasks.BWAA))
    p.add_argument("--weight", default="bnn++")
    p.add_argument("--activation", default="bnn++")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10-jpeg")
    p.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "resnet20-cifar10.th")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.time()
    train = read_tar(args.data / "train.tar", args.train_images // 10)
    test = read_tar(args.data / "test.tar", args.test_images // 10)
    print(f"data: {len(train[0])} train / {len(test[0])} test images in {time.time() - t0:.0f} s", flush=True)
    teacher = models.create("resnet20", pretrained_file=args.teacher)
    print(f"teacher (full precision): {accuracy(teacher, *test, honest=True):.2%}", flush=True)

    rows = []
    for placement in args.placements.split(","):
        r = run(placement, args, train, test)
        rows.append(r)
        print(f"{placement}: {r}", flush=True)
    print(f"\nResNet-20 {args.task} ({args.weight} weights, {args.activation} activations), FT {args.epochs} "
          f"epoch(s) on {len(train[0])} images, honest accuracy on {len(test[0])} test images")
    print(f"{'placement':<10}  {'before FT':>9}  {'binary':>7}  {'train fwd':>9}  {'refused':>7}  "
          f"{'below (min-max)':>15}  {'train s':>7}")
    for r in rows:
        print(f"{r['placement']:<10}  {r['before']:>9.2%}  {r['binary']:>7.2%}  {r['forward']:>9.2%}  "
              f"{r['refused_before']:>7}  {r['below_min']:>6.2f}-{r['below_max']:<6.2f}  {r['train_s']:>7.0f}")


if __name__ == "__main__":
    main()
