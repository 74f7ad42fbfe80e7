"""The Table 2 study of bench/cifar10_resnet20.py on one machine without Ray or MLflow: several runs side by
side, each in a process of its own, for a single-GPU box (or a CPU one) where Ray and MLflow are not installed.

The runs are the same as the Ray bench's: its plan (`plan`, `run_config`: FT from the teacher, Adam + cosine,
the same binarize specs and rules) and the same training recipe, `stages.training.TrainingRun` (DeepSpeed
engine, schedules per step, BatchNorm re-estimated under the honest forward, honest binarized evaluation
every epoch), here with a one-process torch.distributed group (nccl on a GPU, gloo on CPU) instead of a Ray
Train worker and without an MLflow run. What is missing against the Ray bench: Ray's checkpoint
persistence and restarts (a run that raises, or whose process dies, is reported `failed` with its message or
exit code, and the other runs go on; `--resume` skips the
runs whose result.json says finished, diverged or refused, and starts the others again from their last
epoch's checkpoint in the run directory; a run directory made with other settings is refused), and the
MLflow store (the tables come from the run directories).

    PYTHONPATH=. python bench/table2_local.py --parallel 4 --loader-workers 3 --epochs 3 --lr 2e-3 \\
        --tasks BW,BWA,BWAA --variants fp,bc,pc,bnn,bnn+,bnn++,pq,rpc --extra-seeds bnn:BW:1,bnn++:BW:1 \\
        --run-root runs/table2-local --resume
    PYTHONPATH=. python bench/table2_local.py --report-only --run-root runs/table2-local --tasks BW,BWA,BWAA \\
        --variants fp,bc,pc,bnn,bnn+,bnn++,pq,rpc --extra-seeds bnn:BW:1,bnn++:BW:1 --epochs 3 --lr 2e-3

Every option of bench/cifar10_resnet20.py is accepted (`--workers` must stay 1), and: `--parallel N` runs
(processes) at once, each pinned to its share of the cores (`core_slots`; the last run to start takes every
free share) with as many torch threads (where the OS has CPU affinity: Linux; elsewhere each run sizes its
threads by every core),
`--deadline-s S` starts no run after S seconds (runs in flight finish; the rest are left for a later
`--resume`), `--report-only` writes the tables from the run directories and trains nothing,
`--commit` the commit to record (default: git's HEAD; a copy of the tree without .git says `unknown`),
`--deepspeed` the DeepSpeed preset (default cpu: fp32 ZeRO-1, on a GPU too; v100: fp16 + ZeRO-2).
Writes under `--out` (default RUN_ROOT/report): table2.md (both tables of pipelines.report and the runs'
wall times), table2.csv, table2-honesty.csv, table2-runs.csv, table2.png, after every run.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback
from multiprocessing import connection, get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from bench import cifar10_resnet20 as bench  # noqa: E402
from bench import study  # noqa: E402
from pcpp import tasks  # noqa: E402
from pipelines import report  # noqa: E402

DONE = study.DONE
RESULT_FILE = "table2_local.json"  # what a run's process returns: status, message, wall_s, device


# -- one run, in its own process ---------------------------------------------------------------------------
def run_one(config: dict, run_dir: str) -> dict:
    """Train one planned run in this (fresh) process; returns {"status", "message", "wall_s", "device"} and,
    when it trained, "threads" (torch's intra-op threads: the cores of the process's slot).

    Any exception is caught and returned as status `failed` with its message (the study goes on)."""
    started = time.perf_counter()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        os.environ[key] = value
    device = "cpu"
    try:
        import torch
        import torch.distributed as dist

        from stages.config import TrainConfig, absolute, build, write_run_config
        from stages.engine import skip_shm_op
        from stages.training import TrainingRun

        if torch.cuda.is_available():
            backend, device = "nccl", torch.cuda.get_device_name(0)
        else:
            from cluster.train_backend import loopback_interface

            os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
            backend = "gloo"
            skip_shm_op()
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        cfg = absolute(build(TrainConfig, config))
        path = Path(run_dir)
        write_run_config(path, cfg)  # as stages.engine.fit writes it
        training = TrainingRun(cfg, path)
        status = training.run()
        return {"status": status, "message": training.message, "wall_s": time.perf_counter() - started,
                "device": device, "threads": torch.get_num_threads()}
    except Exception as e:  # noqa: BLE001 (one run's failure is recorded; the others go on)
        traceback.print_exc()
        return {"status": "failed", "message": f"{type(e).__name__}: {e}", "wall_s": time.perf_counter() - started,
                "device": device}
    finally:  # an NCCL group left open can hang the process's exit
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def core_slots(parallel: int, cores: list[int] | None = None) -> list[list[int] | None]:
    """The CPU cores of each of `parallel` run slots: the driver's cores (its affinity mask) cut into
    `parallel` contiguous groups whose sizes differ by at most one; with more slots than cores, one core each,
    shared round-robin. [None] * parallel where the OS has no affinity (the runs then share every core)."""
    if cores is None:
        if not hasattr(os, "sched_getaffinity"):
            return [None] * parallel
        cores = sorted(os.sched_getaffinity(0))
    cores = sorted(cores)
    if parallel >= len(cores):
        return [[cores[i % len(cores)]] for i in range(parallel)]
    size, extra = divmod(len(cores), parallel)
    bounds = [k * size + min(k, extra) for k in range(parallel + 1)]
    return [cores[bounds[k]:bounds[k + 1]] for k in range(parallel)]


def _run_process(config: dict, run_dir: str, cores: list[int] | None = None) -> None:
    """A run's process, pinned to `cores` (its slot; TrainingRun then uses that many threads): run_one, its
    result written to RUN_DIR/table2_local.json for the driver."""
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except OSError as e:  # a core of the slot went away (cpuset changed, CPU offline): run unpinned
            print(f"[table2] warning: cannot pin to cores {cores} ({e}); this run uses every core", file=sys.stderr,
                  flush=True)
    result = run_one(config, run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    study._write_json(Path(run_dir) / RESULT_FILE, result)


def start(run: bench.Run, cores: list[int] | None = None):
    """Start `run` in a new (spawned) process on `cores` (None: every core); its result comes back through
    `collect`."""
    (run.run_dir / RESULT_FILE).unlink(missing_ok=True)
    process = get_context("spawn").Process(target=_run_process, args=(run.config, str(run.run_dir), cores),
                                           name=f"table2-{run.label}")
    process.start()
    return process


def collect(run: bench.Run, process, started: float) -> dict:
    """The result of `run`'s ended process; a process that died without one (killed, out of memory, a
    segfault, an abort) is `failed` with its exit code, and the other runs go on."""
    process.join()
    result = study._read_json(run.run_dir / RESULT_FILE)
    if result is None:
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        result = {"status": "failed", "message": f"the run's process died ({how}) without a result",
                  "wall_s": time.perf_counter() - started, "device": "unknown"}
    return result


# -- the tables from the run directories -------------------------------------------------------------------
def run_row(run: bench.Run) -> dict | None:
    """The row pipelines.report's tables take (as `report.collect` makes from MLflow), from the run
    directory's result.json and epochs.jsonl; None when the run is not done."""
    result = study._read_json(run.run_dir / "result.json") or {}
    if result.get("status") not in DONE:
        return None
    last = (study.recorded_epochs(run.run_dir) or [{}])[-1]
    metrics = {k: last.get(k) for k in dict.fromkeys(("binary_acc", *report.HONESTY_METRICS))}
    spec = run.config["binarize"]
    return {"run_id": run.label, "variant": "fp" if spec is None else spec["weight"],
            "task": tasks.FP if spec is None else run.task, "rule": run.config["algorithm"]["rule"],
            "pipeline": "ft", "seed": run.seed, "status": result["status"], "value": metrics["binary_acc"],
            "metrics": metrics, "parent_run_id": None, "start_time": 0}


def publish(args, runs: list[bench.Run], out: Path, title: str, note: str,
            wall_s: float | None) -> report.ReportFiles:
    rows = [r for r in map(run_row, runs) if r is not None]
    body = bench.runs_table(runs)
    runs_md = "## Runs (wall s: all invocations together)\n\n" + "\n".join(
        ["| " + " | ".join(bench.RUNS_HEADER) + " |", "|" + "---|" * len(bench.RUNS_HEADER)]
        + ["| " + " | ".join(b) + " |" for b in body])
    partial = [unfinished_line(r) for r in runs if run_row(r) is None and study.recorded_epochs(r.run_dir)]
    if partial:
        runs_md += ("\n\n## Runs not done (not in the tables above): their last recorded epoch\n\n"
                    "| run | status | epochs | binary % | forward % | gap (points) | soft fraction % |\n"
                    "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(partial))
    devices = sorted({d for r in runs for d in [_device(r.run_dir)] if d})
    when = ("Tables rewritten from the run directories" if wall_s is None
            else f"This invocation's wall time {wall_s:.0f} s")
    extra = (f"{runs_md}\n\n{when}; commit {args.commit}; device(s) "
             f"{', '.join(devices) or 'none yet'}; runs side by side: {args.parallel}; no Ray, no MLflow "
             "(bench/table2_local.py).")
    order = [t for t in tasks.TASKS if t in args.tasks]
    files = report.write_tables(rows, out, bench.STEM, title=title, note=note, transpose=True,
                                extra_markdown=extra, variants=args.variants, tasks=order)
    with (out / f"{bench.STEM}-runs.csv").open("w", newline="") as f:
        csv.writer(f).writerows([bench.RUNS_HEADER, *body])
    return files


def safe_publish(*args) -> None:
    """`publish` during the study: a failure (a half-written epochs.jsonl line of a run in flight, a full
    disk) is printed, never fatal; the final tables are written once every run has ended."""
    try:
        publish(*args)
    except Exception as e:  # noqa: BLE001 (tables are a by-product: never lose the study over them)
        print(f"[table2] warning: could not write the tables: {type(e).__name__}: {e}", flush=True)


def run_status(run: bench.Run) -> str:
    """result.json's status, else the last invocation's (bench.json: `failed` when the process raised), else
    `stopped` (epochs recorded: the process was killed) or `pending`."""
    result = study._read_json(run.run_dir / "result.json") or {}
    record = (study._read_json(run.run_dir / study.RUN_RECORD) or {}).get("invocations") or [{}]
    return result.get("status") or record[-1].get("status") or (
        "stopped" if study.recorded_epochs(run.run_dir) else "pending")


def unfinished_line(run: bench.Run) -> str:
    """A markdown row for a run with epochs recorded but not done (stopped by a deadline, a crash, a kill)."""
    epochs = study.recorded_epochs(run.run_dir)
    e = epochs[-1]
    status = run_status(run)
    gap = 100.0 * (e["forward_acc"] - e["binary_acc"])
    return (f"| {run.label} | {status} | {len(epochs)} of {run.config['optim']['epochs']} "
            f"| {100 * e['binary_acc']:.2f} | {100 * e['forward_acc']:.2f} | {gap:+.2f} "
            f"| {100 * e['soft_fraction']:.1f} |")


def _device(run_dir: Path) -> str | None:
    data = study._read_json(run_dir / study.RUN_RECORD) or {}
    return next((e.get("device") for e in reversed(data.get("invocations", [])) if e.get("device")), None)


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    p.add_argument("--parallel", type=int, default=1, help="runs at once, each its own process (default 1)")
    p.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--report-only", action="store_true", help="write the tables from the run directories only")
    p.add_argument("--commit", default=None, help="the commit to record (default: git HEAD)")
    p.add_argument("--deepspeed", default="cpu",
                   help="DeepSpeed preset or JSON file of every run (distributed.deepspeed; default cpu: fp32)")
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print("\nand the options of bench/cifar10_resnet20.py:")
        bench.parse_args(["--help"])
    args = bench.parse_args(rest)
    if args.workers != 1:
        raise SystemExit(f"error: --workers {args.workers}: this driver runs each run in one process (1)")
    if own.parallel < 1:
        raise SystemExit(f"error: --parallel {own.parallel} must be >= 1")
    vars(args).update(vars(own))
    args.commit = args.commit or study.git_commit(REPO)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    p = bench.study_paths(args, "table2-local")
    teacher, tars, train_dir, test_dir, run_root, out = p.teacher, p.tars, p.train, p.test, p.run_root, p.out
    runs = bench.plan(args, train_dir, test_dir, teacher, run_root)
    for r in runs:
        r.config["distributed"]["deepspeed"] = args.deepspeed
    title = (f"CIFAR-10 ResNet-20 FT: {args.epochs} epoch(s), adam lr {args.lr:g} cosine, batch {args.batch_size}, "
             f"units {args.units}, DeepSpeed {args.deepspeed} (bench/table2_local.py)")
    note = ("Honest binary test accuracy (%) at the last epoch, mean ± sample std over seeds where a cell has "
            "several; FP: full-precision fine-tuning on the same data (one run, shown on every row).")
    for r in runs:
        r.status = run_status(r)
    if args.report_only:
        for r, differs in bench.settings_mismatches(runs):
            print(f"warning: {r.run_dir} was run with other settings than these options ({'; '.join(differs)})",
                  file=sys.stderr)
        files = publish(args, runs, out, title, note, None)
        print(files.markdown.read_text(encoding="utf-8"))
        return 0
    if not teacher.is_file():
        raise SystemExit(f"error: teacher checkpoint {teacher} not found (--teacher / --shared)")
    train_manifest = bench.ensure_shards(tars / "train.tar", train_dir, args.limit_per_class)
    bench.ensure_shards(tars / "test.tar", test_dir, None)
    bench.check_run_dirs(runs, run_root, args.resume)
    left = [r for r in runs if r.status not in DONE]
    print(f"[table2] {len(runs)} runs under {run_root}: {len(runs) - len(left)} done, {len(left)} to run, "
          f"{args.parallel} at once; train {train_manifest['num_samples']} images; commit {args.commit}", flush=True)
    invocation = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"
    slots = core_slots(max(1, min(args.parallel, len(left))))  # fewer runs than --parallel: bigger slots
    free = list(range(len(slots)))
    pending, flight = list(left), {}  # flight: process -> (run, start time, epochs before, its slots)
    while pending or flight:
        late = args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s
        while pending and free and not late:
            r = pending.pop(0)
            # the last run to start takes every free slot: no core stays idle at a study's tail
            taken = [free.pop(0)] if pending else [free.pop(0) for _ in range(len(free))]
            cores = None if slots[taken[0]] is None else sorted({c for k in taken for c in slots[k]})
            where = "" if cores is None else f" on cores {','.join(map(str, cores))}"
            print(f"[table2] start {r.label}{where}", flush=True)
            flight[start(r, cores)] = (r, time.perf_counter(), len(study.recorded_epochs(r.run_dir)), taken)
        if not flight:
            break
        ended = connection.wait([p.sentinel for p in flight])
        for process in [p for p in flight if p.sentinel in ended]:
            r, started, epochs_before, taken = flight.pop(process)
            free.extend(taken)
            result = collect(r, process, started)
            r.status, r.message = result["status"], result["message"]
            r.run_dir.mkdir(parents=True, exist_ok=True)  # a process that died at once made none
            study.record_run(r.run_dir, result["wall_s"], r.status, epochs_before,
                             len(study.recorded_epochs(r.run_dir)), invocation, device=result["device"])
            last = (study.recorded_epochs(r.run_dir) or [{}])[-1]
            print(f"[table2] end   {r.label}: {r.status} {r.message} binary acc {last.get('binary_acc')} "
                  f"forward acc {last.get('forward_acc')} soft fraction {last.get('soft_fraction')} "
                  f"in {result['wall_s']:.1f} s on {result['device']} ({result.get('threads', '?')} threads)",
                  flush=True)
            safe_publish(args, runs, out, title, note, time.perf_counter() - t_start)
    files = publish(args, runs, out, title, note, time.perf_counter() - t_start)
    print("\n" + files.markdown.read_text(encoding="utf-8"))
    not_done = [r.label for r in runs if r.status not in DONE]
    if not_done:
        print(f"not done: {', '.join(not_done)}")
    print(f"this invocation {time.perf_counter() - t_start:.1f} s; run root {run_root}; tables {out}")
    return 0 if not not_done else 1


if __name__ == "__main__":
    sys.exit(main())
