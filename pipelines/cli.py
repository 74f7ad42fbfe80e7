"""The `pcpp` command line. Each subcommand imports what it needs only when it runs.

Importing `pipelines` first sets the loopback environment (cluster.local.loopback_env), before any
subcommand can import Ray. Bad input, an unsatisfiable resource ask and MLflow errors end with exit
status 2 and one line; a run that starts and fails ends with 3.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import cluster  # noqa: F401  (first: keeps Ray on 127.0.0.1 unless RAY_ADDRESS names a cluster)


def _parse_value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _key_values(pairs: list[str]) -> dict:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise SystemExit(f"error: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


PROGRESS_POINTS = (0.0, 0.5, 1.0)


def cmd_quantizers(args) -> int:
    from pcpp import quantizers, theory
    from pcpp.specs import make_quantizer

    rows = []
    for name in quantizers.names():
        q = quantizers.get(name)
        verdicts = [theory.check(quantizers.get(name).set_progress(p)) for p in PROGRESS_POINTS]
        ok = {v.admissible for v in verdicts}
        verdict = "admissible" if ok == {True} else "not admissible" if ok == {False} else "depends on progress"
        on_activations = make_quantizer(name, "activation").describe()
        rows.append((name, q.forward_formula, q.backward_formula, q.describe(),
                     "same" if on_activations == q.describe() else on_activations, verdict))
    header = ("name", "forward F", "backward B", "default schedule", "on activations", "Corollary 1")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nverdicts checked at progress {', '.join(map(str, PROGRESS_POINTS))} on w in [-3, 3]")
    if args.plot:
        from stages.plots import plot_verdicts

        vs = [theory.check(quantizers.get(n).set_progress(args.progress)) for n in quantizers.names()]
        print(f"wrote {plot_verdicts(vs, args.plot, title=f'pcpp quantizers at progress {args.progress:g}')}")
    return 0


def cmd_check(args) -> int:
    from pcpp import quantizers, theory

    params = _key_values(args.param)
    q = quantizers.get(args.name, **params).set_progress(args.progress)
    verdict = theory.check(q, domain=tuple(args.domain), free_slope=args.free_slope)
    print(verdict)
    print(f"forward  F(w) = {q.forward_formula}\nbackward B(w) = {q.backward_formula}\nsource: {q.source}")
    if args.plot:
        from stages.plots import plot_verdicts

        print(f"wrote {plot_verdicts([verdict], args.plot)}")
    return 0 if verdict.admissible or not args.strict else 1


def cmd_prepare(args) -> int:
    from stages.data import prepare

    manifest = prepare(args.src, args.out, shard_size=args.shard_size, skip_corrupt=args.skip_corrupt,
                       limit_per_class=args.limit_per_class, split=args.split)
    skipped = manifest.get("skipped") or []
    print(f"wrote {len(manifest['shards'])} shards, {manifest['num_samples']} images, "
          f"{len(manifest['classes'])} classes to {args.out}"
          + (f" ({len(skipped)} corrupt skipped)" if skipped else ""))
    return 0


def cmd_train(args) -> int:
    from pcpp.surgery import is_keep_fp_policy
    from stages.config import load_config
    from stages.engine import fit
    from stages.profile import PhaseTimer, process_start

    timer = PhaseTimer() if args.profile_startup else None
    if timer is not None:  # from the process's start: the interpreter and the imports of pcpp
        timer.add("pcpp start (interpreter, imports)", time.time() - process_start())
    cfg = load_config(args.config, args.overrides)
    if cfg.binarize is not None and is_keep_fp_policy(cfg.binarize.keep_fp):
        raise ValueError(f"binarize.keep_fp {cfg.binarize.keep_fp} is a policy over a sensitivity scan, and `pcpp "
                         "train` runs none: use `pcpp run` with the sensitivity stage enabled (README, \"Mixed "
                         "binarization\"), or give keep_fp as module-name patterns, e.g. [layer2.0]")
    if timer is not None:
        timer.mark("config")
    result = fit(cfg, run_dir=args.run_dir, timer=timer)
    if timer is not None:  # before the run's last line, which says how it ended
        print_profile(timer)
    m = result.metrics
    if result.ok:
        print(f"{cfg.name}: finished {result.epochs_done} epochs: binary acc {m.get('binary_acc', 0):.4f}, "
              f"training-forward acc {m.get('forward_acc', 0):.4f}; run dir {result.run_dir}; "
              f"MLflow run {result.run_id}")
    else:
        print(f"{cfg.name}: {result.message} (run dir {result.run_dir}, MLflow run {result.run_id})", file=sys.stderr)
    return 0 if result.ok else 3


def cmd_export(args) -> int:
    from stages.export import export_run

    res = export_run(args.run_dir, args.out, args.precision, args.eval_limit)
    print(res["summary"])
    if res["reloaded_acc"] is None:
        print(f"no test shards at the run's data.test ({res['test_dir']}): {args.out} written, its round trip not "
              "checked", file=sys.stderr)
    else:
        exact = "equal the binarized-eval model's" if res["round_trip_error"] == 0 else (
            f"differ from the binarized-eval model's by {res['round_trip_error']:.3g} (largest |difference| / "
            f"largest |logit|)")
        print(f"wrote {args.out} and its manifest; reloaded logits {exact}; on {res['images']} test images: "
              f"binarized-eval accuracy {res['binary_acc']:.4f}, reloaded {res['reloaded_acc']:.4f}")
    return 0


def print_profile(timer) -> None:
    """Ray shut down (timed: it is part of every run's cost), then the table of where the time went."""
    import ray

    from stages.profile import EPOCHS, format_table, process_start

    with timer.phase("Ray shutdown"):
        ray.shutdown()
    print(format_table(timer.seconds, wall=time.time() - process_start(), epochs=timer.seconds.get(EPOCHS, 0.0)),
          flush=True)


def _exit_on_sigterm(message: str) -> None:
    """`ray job stop` sends SIGTERM: leave at once, so Ray tears down the stage tasks and training workers
    this driver owns (a lingering driver would keep them training beside a resubmitted job)."""
    import os
    import signal

    def handler(signum, frame):
        from pipelines.runner import cancel_in_flight

        print(message, file=sys.stderr, flush=True)
        cancel_in_flight()
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def cmd_run(args) -> int:
    from pipelines.config import load_pipeline
    from pipelines.runner import PipelineFailed, run, summary, write_summary

    pc = load_pipeline(args.config, args.overrides)
    message = f"pipeline {pc.name} stopped; finished stages and checkpoints stay under {pc.root_path}"
    try:
        result = run(pc, on_ray_ready=lambda: _exit_on_sigterm(message))
    except PipelineFailed as e:
        print(f"pipeline {pc.name} failed: {e}\nfinished stages are kept under {pc.root_path / 'artifacts'}; "
              "rerun the same command to resume", file=sys.stderr)
        return 3
    print(summary(pc, result))
    write_summary(pc, result)
    return 0


def cmd_sweep(args) -> int:
    from pipelines.sweep import SweepFailed, format_trials, load_sweep, sweep

    cfg, base = load_sweep(args.config, args.overrides)
    try:
        result = sweep(cfg, base)
    except SweepFailed as e:
        print(f"sweep failed: {e}", file=sys.stderr)
        return 3
    print(format_trials(result, cfg.metric))
    return 0


def cmd_report(args) -> int:
    from cluster.local import tracking_uri
    from pipelines.report import make_report

    uri = tracking_uri(args.root, args.tracking_uri)
    figure = False if args.no_figure else (args.figure or True)
    files = make_report(uri, Path(args.out), args.experiment, figure=figure, log=not args.no_log,
                        log_run_id=args.log_run, transpose=args.paper_layout)
    print(files.markdown.read_text())
    print(f"wrote {', '.join(str(p) for p in files.paths)}")
    if files.run_id:
        print(f"logged to MLflow run {files.run_id} (artifacts report/) in {uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcpp", description="ProxConnect++ binarization pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantizers", help="list the registered forward/backward pairs and their verdicts")
    p.add_argument("--plot", type=Path, help="draw F, B and P of every pair into this PNG")
    p.add_argument("--progress", type=float, default=0.5, help="training progress for the plot (0..1)")
    p.set_defaults(func=cmd_quantizers)

    p = sub.add_parser("check", help="Corollary 1 verdict for one pair, optionally plotted")
    p.add_argument("name")
    p.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a parameter, e.g. -p mu=5")
    p.add_argument("--progress", type=float, default=0.0, help="training progress in [0, 1] (default 0)")
    p.add_argument("--domain", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LO", "HI"))
    p.add_argument("--free-slope", type=float, default=1.0,
                   help="slope given to P where B = 0 and F is flat (the paper's 1/mu)")
    p.add_argument("--plot", type=Path, help="draw F, B and P side by side into this PNG")
    p.add_argument("--strict", action="store_true", help="exit 1 when the pair is not admissible")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("prepare", help="image folder / tar / CIFAR batches -> webdataset shards + manifest")
    p.add_argument("src", help="ImageFolder tree, a tar of one, or a CIFAR python-batch directory")
    p.add_argument("out", help="output shard directory")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard (default 5000)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip undecodable images (counted) instead of failing")
    p.add_argument("--limit-per-class", type=int, metavar="N",
                   help="keep the first N images of each class (by name): a small set for a quick run")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which batches of a CIFAR python-batch directory (default train); other sources ignore it")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="one training run (FT or E2E) from a YAML config, on Ray Train + DeepSpeed")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.01")
    p.add_argument("--run-dir", help="run directory (default: under tracking.run_root); a rerun resumes it")
    p.add_argument("--profile-startup", action="store_true",
                   help="print where the wall time went (Ray start, model build, DeepSpeed init, epochs, evaluation, "
                        "checkpoint, MLflow, shutdown) and the ratio wall / epochs")
    p.add_argument("--verbose", action="store_true",
                   help="print everything Ray forwards from its workers (default: one line per stage, epoch, error)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="1-bit export of a `pcpp train` run's final network, round trip verified")
    p.add_argument("run_dir", help="the run directory `pcpp train` printed (holds config.yaml and final/model.pt)")
    p.add_argument("out", help="the .safetensors file to write (its manifest goes beside it, .json)")
    p.add_argument("--precision", default="fp32", help="kept full-precision tensors: fp32 (default), fp16 or bf16")
    p.add_argument("--eval-limit", type=int, default=None, help="score the reloaded file on the first N test images "
                   "(default: the run's own, data.eval_limit of its config)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="the whole pipeline (data, teacher, pretrain, train, sensitivity, export, "
                       "frontier) on Ray")
    p.add_argument("config", help="pipeline YAML (pipelines/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.optim.epochs=3")
    p.add_argument("--verbose", action="store_true",
                   help="print everything Ray forwards from its workers (default: one line per stage, epoch, error)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="Ray Tune + ASHA over any config values (dotted paths); writes the best "
                       "pipeline YAML")
    p.add_argument("config", help="sweep YAML (pipelines/configs/sweep_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true",
                   help="print everything Ray forwards from its workers (default: one line per stage, epoch, error)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="paper-style table (variants x tasks) of binary accuracy from MLflow runs")
    p.add_argument("--root", default="runs", help="run root holding mlflow.db (default runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ROOT/mlflow.db)")
    p.add_argument("--experiment", default="pcpp")
    p.add_argument("--out", default="runs/report",
                   help="directory for EXPERIMENT-binary_acc.md (both tables), .csv, -honesty.csv and .png")
    p.add_argument("--figure", type=Path, help="write the heatmap PNG here instead (default: in --out)")
    p.add_argument("--no-figure", action="store_true", help="write no figure")
    p.add_argument("--paper-layout", action="store_true", help="tasks down, variants across (the paper's Table 2)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--log-run", metavar="RUN_ID",
                   help="MLflow run to log the report to (default: the runs' shared parent run, else a run "
                        "named report tagged pcpp.report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A renamed config key is still read, with a DeprecationWarning naming the new one (stages.schema.renamed):
    # shown to the user of the command, which Python's default filters would hide.
    warnings.filterwarnings("default", message="config key .* is deprecated", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    if hasattr(args, "verbose"):  # before Ray is imported: it reads its log filter then (cluster.progress)
        from cluster.progress import set_verbose

        set_verbose(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pcpp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__module__.startswith("mlflow"):  # the store refused something: one line, no traceback
            from stages.tracking import one_line

            print(f"pcpp {args.command}: MLflow error: {one_line(e)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
