"""CIFAR-10 ResNet-20 fine-tuning study: the paper's Table 2 layout on the ../shared JPEG data.

Fine-tunes (pipeline 'ft') the full-precision ResNet-20 teacher for each variant, task and seed through the
training engine (Ray Train + DeepSpeed, `stages.engine.fit`); every run is an MLflow child of one study run.
After every run it rewrites, under `--out` (default RUN_ROOT/report), the tables of pipelines.report built
from the MLflow store: `table2.md` (accuracy: rows BW / BWA / BWAA, columns the variants, honest binary
accuracy in %, mean ± std over seeds; honesty: the forward/binary gap and soft fraction of each run; the runs'
wall times), `table2.csv`, `table2-honesty.csv`, `table2-runs.csv` and the figure `table2.png`, and logs them
to the study run. A crash or reboot loses at most the run in progress:

    PYTHONPATH=. .venv/bin/python bench/cifar10_resnet20.py --epochs 3 --tasks BW,BWA,BWAA \
        --variants fp,bc,pc,bnn,bnn+,bnn++,pq,rpc --extra-seeds bnn:BW:1,bnn++:BW:1 \
        --run-root runs/table2 --resume            # the same command again after a reboot continues
    PYTHONPATH=. .venv/bin/python bench/cifar10_resnet20.py --variants fp,bnn++ --tasks BW \
        --epoch-length 2048 --eval-limit 2000          # smoke run, a few minutes on 2 cores

`--resume` (bench/study.py): a run whose MLflow run ended finished or diverged is not rerun; one with epochs
recorded resumes from its last epoch's checkpoint; a run directory made with other settings is refused.
Variants: 'fp' (binarize: null, run once, shown in every row), any registered pair ('bc', 'bnn', 'bnn+',
'bnn++', 'poly', 'ede', ...) trained with PC++, or an update rule 'pq' / 'rpc' / 'ptb' (weights binarized
with 'bc' as the target). Tasks: BW (weights), BWA (+ activations with the same pair; 'bc' for the rules),
BWAA (+ 8-bit wrapped accumulators). Seeds: `--seed` for every run, `--extra-seeds VARIANT:TASK:SEED,...`
for more runs of some cells. All runs land in one MLflow SQLite store under the run root.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from bench import study  # noqa: E402
from cluster.local import ensure_ray, tracking_uri  # noqa: E402
from pcpp import quantizers, rules, tasks  # noqa: E402
from pipelines import report  # noqa: E402
from stages import data as sdata  # noqa: E402
from stages.config import TrainConfig, build  # noqa: E402
from stages.engine import fit  # noqa: E402

DEFAULT_SHARED = REPO.parent / "shared"
TASKS = tasks.TASKS
RULE_VARIANTS = tuple(r for r in rules.rule_names() if r != "pc++")  # pq, rpc, ptb
RULE_TARGET = "bc"  # the binarization target of the update rules (weights, and activations under BWA)
SHARD_SIZE = 5000
STEM = "table2"


@dataclass
class Run:
    variant: str
    task: str  # BW | BWA | BWAA, or FP for the full-precision run
    seed: int
    run_dir: Path
    config: dict
    state: study.RunState | None = None
    status: str = "pending"
    message: str = ""

    @property
    def label(self) -> str:
        return f"{self.variant}-{self.task}-s{self.seed}"


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
    p.add_argument("--seed", type=int, default=0, help="the seed of every run (default 0)")
    p.add_argument("--extra-seeds", default="", metavar="VARIANT:TASK:SEED,...",
                   help="more seeds for some cells, e.g. bnn:BW:1,bnn++:BW:1 (fp's task is FP)")
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
                   help="continue the study in --run-root: skip runs done, resume half-done ones")
    p.add_argument("--experiment", default="bench-cifar10-resnet20",
                   help="MLflow experiment name (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"directory of the tables and figure ({STEM}.md, .csv, -honesty.csv, -runs.csv, .png; "
                        "default RUN_ROOT/report)")
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
    try:
        args.extra_seeds = study.parse_extra_seeds(args.extra_seeds, args.variants, args.tasks, args.seed)
    except ValueError as e:
        p.error(str(e))
    return args


# -- data ------------------------------------------------------------------------------------------------
def ensure_shards(src: Path, out: Path, limit_per_class: int | None) -> dict:
    """Prepared shards of `src` in `out`, reused when the manifest verifies and matches the request."""
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
    if not src.is_file():
        raise SystemExit(f"error: {src} not found (set --shared to the project's shared directory)")
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


def run_config(args, variant: str, task: str, seed: int, train_dir: Path, test_dir: Path, teacher: Path,
               run_root: Path) -> dict:
    return {
        "name": f"bench-{variant}-{task}-s{seed}",
        "seed": seed,
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
    """fp first, then every task x variant at the base seed, then the extra seeds (the table fills first)."""
    cells = ([("fp", "FP")] if "fp" in args.variants else []) + \
        [(v, t) for t in args.tasks for v in args.variants if v != "fp"]
    keys = [(v, t, args.seed) for v, t in cells]
    keys += [(v, t, s) for v, t in cells for s in args.extra_seeds.get((v, t), [])]
    return [Run(v, t, s, run_root / f"{v}-{t}-s{s}",
                run_config(args, v, t, s, train_dir, test_dir, teacher, run_root)) for v, t, s in keys]


def execute(run: Run, index: int, total: int, the_study: study.Study) -> None:
    cfg = build(TrainConfig, run.config)
    spec = run.config["binarize"]
    what = "full precision" if spec is None else (
        f"weight {spec['weight']}, activation {spec.get('activation')}, accumulator {spec.get('accumulator_bits')}, "
        f"rule {run.config['algorithm']['rule']}, units {spec['units']}")
    before = len(study.recorded_epochs(run.run_dir))
    print(f"[bench] ({index}/{total}) start {run.label}: {what}; run dir {run.run_dir}"
          + (f"; resuming after epoch {before}" if before else ""), flush=True)
    the_study.begin_run(run.run_dir)
    try:
        result = fit(cfg, run_dir=run.run_dir, parent_run_id=the_study.parent_run_id)
        run.status, run.message = result.status, result.message
    except Exception as e:  # a driver-side failure (bad config, missing file): record it, go on
        run.status, run.message = "failed", f"{type(e).__name__}: {e}"
    wall = the_study.end_run(run.status)
    epochs = study.recorded_epochs(run.run_dir)
    m = epochs[-1] if epochs else {}
    if run.status == "finished" and "binary_acc" in m:
        print(f"[bench] ({index}/{total}) end   {run.label}: binary acc {m['binary_acc']:.4f} (training forward "
              f"{m.get('forward_acc', float('nan')):.4f}, soft fraction {m.get('soft_fraction', float('nan')):.3f}), "
              f"{len(epochs)} epochs, wall {wall:.1f} s", flush=True)
    else:
        print(f"[bench] ({index}/{total}) end   {run.label}: {run.status.upper()} in {wall:.1f} s: "
              f"{run.message or 'no metrics'}", flush=True)


# -- tables ----------------------------------------------------------------------------------------------
RUNS_HEADER = ["run", "status", "epochs", "wall s", "train s", "img/s train", "overflow"]


def runs_table(runs: list[Run]) -> list[list[str]]:
    """Per run: status, epochs recorded, wall time over all invocations, training time and throughput."""
    rows = []
    for r in runs:
        epochs = study.recorded_epochs(r.run_dir)
        train_s = sum(e.get("epoch_time_s", 0.0) for e in epochs)
        images = sum(e.get("images_per_s", 0.0) * e.get("epoch_time_s", 0.0) for e in epochs)
        overflow = epochs[-1].get("overflow_rate") if epochs else None
        rows.append([r.label, r.status, str(len(epochs)), f"{study.run_wall_s(r.run_dir):.1f}",
                     f"{train_s:.1f}" if epochs else "—", f"{images / train_s:.0f}" if train_s > 0 else "—",
                     "—" if overflow is None else f"{overflow:.4f}"])
    return rows


def format_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(line.rstrip() for line in lines)


def publish(args, runs: list[Run], uri: str, out: Path, the_study: study.Study, title: str,
            note: str) -> report.ReportFiles | None:
    """Rewrite the tables and the figure from the MLflow store and log them to the study run; a failure here
    is printed, never fatal: the study goes on."""
    from stages.tracking import RUN_ID_FILE

    try:
        ids = [(r.run_dir / RUN_ID_FILE).read_text().strip() for r in runs if (r.run_dir / RUN_ID_FILE).exists()]
        rows = report.collect(uri, args.experiment, run_ids=ids)
        body = runs_table(runs)
        runs_md = "## Runs (wall s: all invocations together)\n\n" + \
            "\n".join(["| " + " | ".join(RUNS_HEADER) + " |", "|" + "---|" * len(RUNS_HEADER)]
                      + ["| " + " | ".join(b) + " |" for b in body])
        commits = ", ".join(the_study.commits)
        extra = (f"{runs_md}\n\nStudy wall time {the_study.total_wall_s:.0f} s over "
                 f"{len(the_study.data['invocations'])} invocation(s); commit(s) {commits}; MLflow store `{uri}`.")
        files = report.write_tables(rows, out, STEM, title=title, note=note, transpose=True, extra_markdown=extra,
                                    variants=args.variants, tasks=args.tasks)
        with (out / f"{STEM}-runs.csv").open("w", newline="") as f:
            csv.writer(f).writerows([RUNS_HEADER, *body])
        report.log_report(uri, args.experiment, files, rows, key=STEM, run_id=the_study.parent_run_id)
        the_study.run.log_files([out / f"{STEM}-runs.csv"], artifact_path="report")
        return files
    except Exception as e:  # noqa: BLE001 (tables are a by-product: never lose the study over them)
        print(f"[bench] warning: could not write the tables: {type(e).__name__}: {e}", flush=True)
        return None


# -- main ------------------------------------------------------------------------------------------------
@dataclass
class StudyPaths:
    teacher: Path
    tars: Path  # the JPEG tars (train.tar, test.tar) under --shared
    train: Path  # prepared shards
    test: Path
    run_root: Path
    out: Path  # tables and figure


def study_paths(args: argparse.Namespace, stem: str) -> StudyPaths:
    """Where a study's inputs and outputs are, from its arguments (the run root defaults to
    runs/bench/<stem>-<time>)."""
    shared = args.shared.expanduser().resolve()
    data_dir = args.data_dir.expanduser().resolve()
    suffix = "" if args.limit_per_class is None else f"-lpc{args.limit_per_class}"
    run_root = (args.run_root or Path("runs") / "bench" / time.strftime(f"{stem}-%Y%m%d-%H%M%S")).expanduser().resolve()
    return StudyPaths((args.teacher or shared / "teachers" / "resnet20-cifar10.th").expanduser().resolve(),
                      shared / "data" / "cifar10-jpeg", data_dir / f"train{suffix}", data_dir / "test", run_root,
                      (args.out or run_root / "report").expanduser().resolve())


def settings_mismatches(runs: list[Run]) -> list[tuple[Run, list[str]]]:
    """(run, its differences) for each run whose directory was made with other settings than planned."""
    return [(r, differs) for r in runs if (differs := study.config_differences(r.run_dir, r.config))]


def check_run_dirs(runs: list[Run], run_root: Path, resume: bool) -> None:
    """Refuse (SystemExit) run directories that exist without `resume`, or that were made with other settings
    (a table must not mix them)."""
    taken = [r.run_dir for r in runs if (r.run_dir / "config.yaml").exists()]
    if taken and not resume:
        raise SystemExit(f"error: run directories already exist under {run_root}: "
                         f"{', '.join(p.name for p in taken)}; pass --resume to continue them or another --run-root")
    mismatched = settings_mismatches(runs)
    if mismatched:
        r, differs = mismatched[0]
        raise SystemExit(f"error: {r.run_dir} was run with other settings ({'; '.join(differs)}): "
                         f"a table must not mix them; use another --run-root or the settings it was run with")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = study_paths(args, "cifar10-resnet20")
    teacher, tars, train_dir, test_dir, run_root, out = p.teacher, p.tars, p.train, p.test, p.run_root, p.out
    if not teacher.is_file():
        raise SystemExit(f"error: teacher checkpoint {teacher} not found (--teacher / --shared)")

    t_start = time.perf_counter()
    train_manifest = ensure_shards(tars / "train.tar", train_dir, args.limit_per_class)
    test_manifest = ensure_shards(tars / "test.tar", test_dir, None)

    runs = plan(args, train_dir, test_dir, teacher, run_root)
    check_run_dirs(runs, run_root, args.resume)
    run_root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(run_root)

    epoch_length = args.epoch_length or train_manifest["num_samples"]
    eval_n = min(args.eval_limit or test_manifest["num_samples"], test_manifest["num_samples"])
    settings = {"epochs": args.epochs, "epoch_length": epoch_length, "eval_images": eval_n,
                "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam+cosine", "units": args.units,
                "workers": args.workers, "seed": args.seed,
                "extra_seeds": ",".join(f"{v}:{t}:{s}" for (v, t), ss in args.extra_seeds.items() for s in ss)}
    the_study = study.Study(run_root, uri, args.experiment, run_root.name, settings, study.git_commit(REPO))
    for r in runs:
        r.state = study.run_state(r.run_dir, uri)
        if r.state.state == "done":
            study.close_open_run(uri, r.run_dir, r.state)
            r.status = r.state.status
    left = [r for r in runs if r.state.left]
    print(f"[bench] teacher {teacher}\n[bench] train {train_dir} ({train_manifest['num_samples']} images), "
          f"test {test_dir} ({test_manifest['num_samples']} images)\n[bench] settings "
          + ", ".join(f"{k} {v}" for k, v in settings.items())
          + f"\n[bench] {len(runs)} runs under {run_root}: {len(runs) - len(left)} done, "
          f"{sum(r.state.state == 'partial' for r in left)} to resume, {sum(r.state.state == 'new' for r in left)} new;"
          f" study run {the_study.parent_run_id}", flush=True)
    for r in runs:
        if not r.state.left:
            print(f"[bench] skip {r.label}: {r.state.status} ({r.state.epochs} epochs, MLflow run {r.state.run_id})",
                  flush=True)

    title = (f"CIFAR-10 ResNet-20 FT: {args.epochs} epoch(s) of {epoch_length} images, eval on {eval_n} test "
             f"images, adam lr {args.lr:g} cosine, batch {args.batch_size}, units {args.units}")
    note = ("Honest binary test accuracy (%) at the last epoch, mean ± sample std over seeds where a cell has "
            "several; FP: full-precision fine-tuning on the same data (one run, shown on every row).")
    the_study.heartbeat()
    if left:
        t_ray = time.perf_counter()
        ensure_ray()  # start (or join) Ray once, so its start-up is not charged to the first run
        print(f"[bench] Ray ready in {time.perf_counter() - t_ray:.1f} s", flush=True)
    for i, run in enumerate(left, 1):
        execute(run, i, len(left), the_study)
        the_study.save(runs_done=i)
        publish(args, runs, uri, out, the_study, title, note)  # partial tables survive a crash

    failed = [r.label for r in runs if r.status not in study.DONE]
    files = publish(args, runs, uri, out, the_study, title, note)
    the_study.finish(failed)
    if files is not None:
        text = files.markdown.read_text(encoding="utf-8")
        print("\n" + text)
        print(f"wrote {', '.join(str(p) for p in files.paths)}, {out / f'{STEM}-runs.csv'}")
    for r in runs:
        if r.status not in study.DONE:
            print(f"{r.label}: {r.status}: {r.message}")
    print(f"\nthis invocation {time.perf_counter() - t_start:.1f} s ({len(left)} runs); study "
          f"{the_study.total_wall_s:.1f} s over {len(the_study.data['invocations'])} invocation(s)\n"
          f"run root {run_root}\nMLflow store {uri}\n  browse: mlflow ui --backend-store-uri {uri}  "
          f"(experiment {args.experiment!r}, run {run_root.name!r}: the report is under its artifacts, report/)")

    import ray

    if ray.is_initialized():
        ray.shutdown()
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
