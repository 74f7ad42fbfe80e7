"""CIFAR-10 ResNet-20 fine-tuning benchmark: the paper's Table 2 layout on the ../shared JPEG data.

Fine-tunes (pipeline 'ft') the full-precision ResNet-20 teacher for each variant and task through the
training engine (Ray Train + DeepSpeed, `stages.engine.fit`), then prints the final honest binary accuracy
per task (rows BW / BWA / BWAA) and variant (columns; FP = full-precision fine-tuning on the same data),
and a second table with wall time, throughput and the honesty figures of every run. Prints figures only.

    PYTHONPATH=. .venv/bin/python bench/cifar10_resnet20.py --epochs 5
    PYTHONPATH=. .venv/bin/python bench/cifar10_resnet20.py --variants fp,bnn++ --tasks BW \
        --epoch-length 2048 --eval-limit 2000          # smoke run, a few minutes on 2 cores

Variants: 'fp' (binarize: null, run once, shown in every row), any registered pair ('bc', 'bnn', 'bnn+',
'bnn++', 'poly', 'ede', ...) trained with PC++, or an update rule 'pq' / 'rpc' / 'ptb' (weights binarized
with 'bc' as the target). Tasks: BW (weights), BWA (+ activations with the same pair; 'bc' for the rules),
BWAA (+ 8-bit wrapped accumulators). All runs land in one MLflow SQLite store under the run root.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from cluster.local import ensure_ray, tracking_uri  # noqa: E402
from pcpp import quantizers, rules, tasks  # noqa: E402
from stages import data as sdata  # noqa: E402
from stages.config import TrainConfig, build  # noqa: E402
from stages.engine import fit  # noqa: E402

DEFAULT_SHARED = REPO.parent / "shared"
TASKS = tasks.TASKS
RULE_VARIANTS = tuple(r for r in rules.rule_names() if r != "pc++")  # pq, rpc, ptb
RULE_TARGET = "bc"  # the binarization target of the update rules (weights, and activations under BWA)
SHARD_SIZE = 5000


@dataclass
class Run:
    variant: str
    task: str  # BW | BWA | BWAA, or FP for the full-precision run
    run_dir: Path
    config: dict
    status: str = "pending"
    message: str = ""
    metrics: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)  # epochs.jsonl records
    resumed_from: int = 0  # epochs already recorded before this invocation (--resume)
    wall_s: float = 0.0
    run_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.variant}-{self.task}"

    @staticmethod
    def _images(epochs: list) -> int:
        return int(round(sum(e.get("images_per_s", 0.0) * e.get("epoch_time_s", 0.0) for e in epochs)))

    @property
    def trained_images(self) -> int:
        return self._images(self.epochs)

    @property
    def images_this_call(self) -> int:
        return self._images(self.epochs[self.resumed_from:])

    @property
    def train_time_s(self) -> float:
        return sum(e.get("epoch_time_s", 0.0) for e in self.epochs)


# -- arguments -------------------------------------------------------------------------------------------
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per run (default 1)")
    p.add_argument("--variants", default="fp,bc,bnn,bnn+,bnn++",
                   help="comma list: fp, a registered pair, or an update rule pq / rpc / ptb (default %(default)s)")
    p.add_argument("--tasks", default="BW,BWA", help="comma list of BW, BWA, BWAA (default %(default)s)")
    p.add_argument("--epoch-length", type=int, default=None,
                   help="training samples per epoch, all workers together (default: the whole train set)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per run (default 1)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers per training worker (default 0)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine schedule (default 1e-3)")
    p.add_argument("--units", choices=("scaled", "raw"), default="scaled",
                   help="the pairs act in units of the layer scale s (scaled, default) or on raw weights")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                   help="the project's shared directory (default %(default)s)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher checkpoint (default: SHARED/teachers/resnet20-cifar10.th)")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/pcpp/cifar10-shards"),
                   help="cache directory for the prepared shards, train/ and test/ below it (default %(default)s)")
    p.add_argument("--limit-per-class", type=int, default=None,
                   help="prepare only the first N train images of each class (cached separately)")
    p.add_argument("--run-root", type=Path, default=None,
                   help="run directories and the MLflow store (default: ./runs/bench/cifar10-resnet20-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="let existing run directories under --run-root resume instead of refusing them")
    p.add_argument("--experiment", default="bench-cifar10-resnet20",
                   help="MLflow experiment name (default %(default)s)")
    p.add_argument("--csv", type=Path, default=None, help="also write one row per run to this CSV file")
    p.add_argument("--markdown", type=Path, default=None, help="also write both tables to this Markdown file")
    args = p.parse_args(argv)

    args.variants = _csv_list(args.variants)
    args.tasks = [t.upper() for t in _csv_list(args.tasks)]
    valid = ["fp", *[n for n in quantizers.names() if n != "fp"], *RULE_VARIANTS]
    bad = [v for v in args.variants if v not in valid]
    if bad or not args.variants:
        p.error(f"unknown variant(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(valid)}")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"variant listed twice: {','.join(args.variants)}")
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        p.error(f"unknown task(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(TASKS)}")
    if len(set(args.tasks)) != len(args.tasks):
        p.error(f"task listed twice: {','.join(args.tasks)}")
    for name in ("epochs", "workers", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size % args.workers:
        p.error(f"--batch-size {args.batch_size} is not divisible by --workers {args.workers}")
    for name in ("epoch_length", "eval_limit", "limit_per_class"):
        value = getattr(args, name)
        if value is not None and value < args.workers:
            p.error(f"--{name.replace('_', '-')} must be >= --workers ({args.workers})")
    if args.epoch_length is not None and args.epoch_length // args.workers < args.batch_size // args.workers:
        p.error(f"--epoch-length {args.epoch_length} is shorter than one batch ({args.batch_size}): no step would run")
    return args


# -- data ------------------------------------------------------------------------------------------------
def ensure_shards(src: Path, out: Path, limit_per_class: int | None) -> dict:
    """Prepared shards of `src` in `out`, reused when the manifest verifies and matches the request."""
    if not src.is_file():
        raise SystemExit(f"error: {src} not found (set --shared to the project's shared directory)")
    if (out / sdata.MANIFEST).exists():
        try:
            manifest = sdata.verify(out)
        except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
            print(f"[bench] cached shards in {out} do not verify ({e}); preparing again", flush=True)
        else:
            wanted = {"source": str(src.resolve()), "shard_size": SHARD_SIZE, "limit_per_class": limit_per_class}
            differs = {k: manifest.get(k) for k, v in wanted.items() if manifest.get(k) != v}
            if not differs:
                print(f"[bench] shards cached: {out} ({manifest['num_samples']} images, "
                      f"{len(manifest['shards'])} shards, verified)", flush=True)
                return manifest
            print(f"[bench] cached shards in {out} were made differently ({differs}); preparing again", flush=True)
    start = time.perf_counter()
    print(f"[bench] preparing shards: {src} -> {out}", flush=True)
    manifest = sdata.prepare(src, out, shard_size=SHARD_SIZE, limit_per_class=limit_per_class, progress=True)
    print(f"[bench] prepared {manifest['num_samples']} images in {len(manifest['shards'])} shards "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return manifest


# -- runs ------------------------------------------------------------------------------------------------
def binarize_spec(variant: str, task: str, units: str) -> dict | None:
    if variant == "fp":
        return None
    pair = RULE_TARGET if variant in RULE_VARIANTS else variant
    return tasks.spec(task, pair, units=units)


def run_config(args, variant: str, task: str, train_dir: Path, test_dir: Path, teacher: Path,
               run_root: Path) -> dict:
    return {
        "name": f"bench-{variant}-{task}",
        "seed": args.seed,
        "init": "teacher",
        "teacher": str(teacher),
        "model": {"name": "resnet20", "num_classes": 10},
        "data": {"train": str(train_dir), "test": str(test_dir), "batch_size": args.batch_size,
                 "num_workers": args.loader_workers, "epoch_length": args.epoch_length,
                 "eval_limit": args.eval_limit},
        "binarize": binarize_spec(variant, task, args.units),
        "algorithm": {"rule": variant if variant in RULE_VARIANTS else "pc++"},
        "optim": {"name": "adam", "lr": args.lr, "epochs": args.epochs, "lr_schedule": "cosine"},
        "distributed": {"num_workers": args.workers},
        "tracking": {"experiment": args.experiment, "run_root": str(run_root)},
    }


def plan(args, train_dir: Path, test_dir: Path, teacher: Path, run_root: Path) -> list[Run]:
    runs = []
    if "fp" in args.variants:
        runs.append(Run("fp", "FP", run_root / "fp-FP",
                        run_config(args, "fp", "FP", train_dir, test_dir, teacher, run_root)))
    for task in args.tasks:
        for variant in args.variants:
            if variant != "fp":
                runs.append(Run(variant, task, run_root / f"{variant}-{task}",
                                run_config(args, variant, task, train_dir, test_dir, teacher, run_root)))
    return runs


def _read_epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "epochs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def execute(run: Run, index: int, total: int) -> None:
    cfg = build(TrainConfig, run.config)
    spec = run.config["binarize"]
    what = "full precision" if spec is None else (
        f"weight {spec['weight']}, activation {spec.get('activation')}, accumulator {spec.get('accumulator_bits')}, "
        f"rule {run.config['algorithm']['rule']}, units {spec['units']}")
    print(f"[bench] ({index}/{total}) start {run.variant} {run.task}: {what}; run dir {run.run_dir}", flush=True)
    run.resumed_from = len(_read_epochs(run.run_dir))
    if run.resumed_from:
        print(f"[bench] ({index}/{total}) resuming {run.label}: {run.resumed_from} epoch(s) already done", flush=True)
    start = time.perf_counter()
    try:
        result = fit(cfg, run_dir=run.run_dir)
    except Exception as e:  # a driver-side failure (bad config, missing file): record it, go on
        run.wall_s = time.perf_counter() - start
        run.status, run.message = "failed", f"{type(e).__name__}: {e}"
        print(f"[bench] ({index}/{total}) end   {run.variant} {run.task}: FAILED in {run.wall_s:.1f} s: "
              f"{run.message}", flush=True)
        return
    run.wall_s = time.perf_counter() - start
    run.status, run.message, run.run_id = result.status, result.message, result.run_id
    run.epochs = _read_epochs(run.run_dir)
    run.metrics = dict(result.metrics) or (dict(run.epochs[-1]) if run.epochs else {})
    if run.status == "finished" and "binary_acc" in run.metrics:
        m = run.metrics
        print(f"[bench] ({index}/{total}) end   {run.variant} {run.task}: binary acc {m['binary_acc']:.4f} "
              f"(training forward {m.get('forward_acc', float('nan')):.4f}, soft fraction "
              f"{m.get('soft_fraction', float('nan')):.3f}), {result.epochs_done} epochs, wall {run.wall_s:.1f} s",
              flush=True)
    else:
        print(f"[bench] ({index}/{total}) end   {run.variant} {run.task}: {run.status.upper()} "
              f"in {run.wall_s:.1f} s: {run.message or 'no metrics'}", flush=True)


# -- tables ----------------------------------------------------------------------------------------------
def _pct(run: Run | None) -> str:
    if run is None:
        return "—"
    if run.status != "finished" or "binary_acc" not in run.metrics:
        return run.status
    return f"{100 * run.metrics['binary_acc']:.2f}"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def accuracy_table(args, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    by_key = {(r.variant, r.task): r for r in runs}
    fp = by_key.get(("fp", "FP"))
    variants = [v for v in args.variants if v != "fp"]
    header = ["task", *(["FP"] if fp is not None else []), *[v.upper() for v in variants]]
    rows = []
    for task in args.tasks:
        rows.append([task, *([_pct(fp)] if fp is not None else []), *[_pct(by_key.get((v, task))) for v in variants]])
    return header, rows


def timing_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "status", "epochs", "binary %", "fwd %", "gap", "soft frac", "overflow", "wall s", "train s",
              "img/s train", "img/s wall"]
    rows = []
    for r in runs:
        m = r.metrics
        ok = "binary_acc" in m
        images = r.trained_images
        rows.append([
            r.label, r.status, str(len(r.epochs)),
            _num(100 * m["binary_acc"] if ok else None, ".2f"),
            _num(100 * m["forward_acc"] if "forward_acc" in m else None, ".2f"),
            _num(100 * m["forward_binary_gap"] if "forward_binary_gap" in m else None, "+.2f"),
            _num(m.get("soft_fraction"), ".3f"),
            _num(m.get("overflow_rate"), ".4f"),
            f"{r.wall_s:.1f}",
            _num(r.train_time_s if r.epochs else None, ".1f"),
            _num(images / r.train_time_s if r.epochs and r.train_time_s > 0 else None, ".0f"),
            _num(r.images_this_call / r.wall_s if r.images_this_call and r.wall_s > 0 else None, ".0f"),
        ])
    return header, rows


def format_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, runs: list[Run], settings: dict) -> None:
    keys = ["binary_acc", "forward_acc", "forward_binary_gap", "soft_fraction", "overflow_rate", "flip_ratio",
            "loss", "train_forward_acc", "images_per_s", "epoch_time_s"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "task", "status", "message", "epochs_done", "wall_s", "train_s", "trained_images",
                    *keys, "run_dir", "mlflow_run_id", *settings])
        for r in runs:
            w.writerow([r.variant, r.task, r.status, r.message, len(r.epochs), f"{r.wall_s:.3f}",
                        f"{r.train_time_s:.3f}", r.trained_images, *[r.metrics.get(k, "") for k in keys],
                        str(r.run_dir), r.run_id or "", *settings.values()])


# -- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared = args.shared.expanduser().resolve()
    teacher = (args.teacher or shared / "teachers" / "resnet20-cifar10.th").expanduser().resolve()
    if not teacher.is_file():
        raise SystemExit(f"error: teacher checkpoint {teacher} not found (--teacher / --shared)")
    tars = shared / "data" / "cifar10-jpeg"
    data_dir = args.data_dir.expanduser().resolve()
    suffix = "" if args.limit_per_class is None else f"-lpc{args.limit_per_class}"
    train_dir, test_dir = data_dir / f"train{suffix}", data_dir / "test"
    run_root = (args.run_root or Path("runs") / "bench" / time.strftime("cifar10-resnet20-%Y%m%d-%H%M%S"))
    run_root = run_root.expanduser().resolve()

    t_start = time.perf_counter()
    train_manifest = ensure_shards(tars / "train.tar", train_dir, args.limit_per_class)
    test_manifest = ensure_shards(tars / "test.tar", test_dir, None)

    runs = plan(args, train_dir, test_dir, teacher, run_root)
    taken = [r.run_dir for r in runs if (r.run_dir / "config.yaml").exists()]
    if taken and not args.resume:
        raise SystemExit(f"error: run directories already exist under {run_root}: "
                         f"{', '.join(p.name for p in taken)}; pass --resume to continue them or another --run-root")
    run_root.mkdir(parents=True, exist_ok=True)

    epoch_length = args.epoch_length or train_manifest["num_samples"]
    eval_n = min(args.eval_limit or test_manifest["num_samples"], test_manifest["num_samples"])
    settings = {"epochs": args.epochs, "epoch_length": epoch_length, "eval_images": eval_n,
                "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam+cosine", "units": args.units,
                "workers": args.workers, "seed": args.seed}
    print(f"[bench] teacher {teacher}\n[bench] train {train_dir} ({train_manifest['num_samples']} images), "
          f"test {test_dir} ({test_manifest['num_samples']} images)\n[bench] settings "
          + ", ".join(f"{k} {v}" for k, v in settings.items())
          + f"\n[bench] {len(runs)} runs under {run_root}", flush=True)

    t_ray = time.perf_counter()
    ensure_ray()  # start (or join) Ray once, so its start-up is not charged to the first run
    print(f"[bench] Ray ready in {time.perf_counter() - t_ray:.1f} s", flush=True)

    for i, run in enumerate(runs, 1):
        execute(run, i, len(runs))

    total_s = time.perf_counter() - t_start
    acc_header, acc_rows = accuracy_table(args, runs)
    time_header, time_rows = timing_table(runs)
    title = (f"CIFAR-10 ResNet-20 FT, final honest binary test accuracy (%): {args.epochs} epoch(s) of "
             f"{epoch_length} images, eval on {eval_n} test images, adam lr {args.lr:g} cosine, batch "
             f"{args.batch_size}, units {args.units}, {args.workers} worker(s)")
    note = "FP: full-precision fine-tuning on the same data (one run, shown on every row)"
    print(f"\n{title}\n{note}\n\n{format_text(acc_header, acc_rows)}\n")
    print("Runs (fwd = training forward; gap = fwd - binary; soft frac = share of binarized weights not at +-s; "
          "img/s train = training loop only, img/s wall = incl. Ray/DeepSpeed start-up and evaluation)\n")
    print(format_text(time_header, time_rows))
    failed = [r for r in runs if r.status != "finished"]
    for r in failed:
        print(f"\n{r.label}: {r.status}: {r.message}")
    uri = tracking_uri(run_root)
    print(f"\ntotal wall time {total_s:.1f} s ({len(runs)} runs)\nrun root {run_root}\nMLflow store {uri}\n"
          f"  browse: mlflow ui --backend-store-uri {uri}  (experiment {args.experiment!r})")

    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"{title}\n\n{note}\n\n{format_markdown(acc_header, acc_rows)}\n\n"
                                 f"{format_markdown(time_header, time_rows)}\n\nMLflow store: `{uri}`\n")
        print(f"wrote {args.markdown}")
    if args.csv:
        write_csv(args.csv, runs, settings)
        print(f"wrote {args.csv}")

    import ray

    if ray.is_initialized():
        ray.shutdown()
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
