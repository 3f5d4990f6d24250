"""`jaxkit sweep` (jaxkit.sweep's runs of a sweep file, then their report)
and `jaxkit report` (the table and plots of any run directories)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from jaxkit.sweep import plots
from jaxkit.sweep.parallel import run_parallel
from jaxkit.sweep.plan import DEFAULT_METRICS, SweepError, load_sweep, resolve
from jaxkit.sweep.report import MetricSpec, ReportError, find_runs, load_run, write_report
from jaxkit.sweep.runner import plan_text, run_sweep, shell_commands, slurm_script


def _write_report(run_dirs, out: Path, metrics, x) -> None:
    try:
        written = write_report([load_run(d) for d in run_dirs], out, metrics, x)
    except plots.MissingMatplotlib as e:
        raise SystemExit(str(e)) from None
    print(written[0].read_text(), end="")
    print("report: " + ", ".join(map(str, written)))


def cmd_sweep(args) -> None:
    sweep = load_sweep(args.sweep)
    from jaxkit.run.build import check_config  # imports jax
    configs = resolve(sweep, check_config)
    if args.only is not None and not 0 <= args.only < len(sweep.runs):
        raise SweepError(f"--only {args.only}: {sweep.path} has {len(sweep.runs)} runs "
                         f"(0 to {len(sweep.runs) - 1})")
    if args.dry_run:
        print(plan_text(sweep, configs))
        return
    if args.print_commands:
        print(shell_commands(sweep), end="")
        return
    if args.slurm:
        sweep.out.mkdir(parents=True, exist_ok=True)  # where the tasks' logs go
        Path(args.slurm).write_text(slurm_script(sweep))
        print(f"wrote {args.slurm} ({len(sweep.runs)} array tasks): sbatch {args.slurm}")
        return
    if args.only is None:
        try:
            plots.pyplot()  # the report needs it: say so before the runs, not after
        except plots.MissingMatplotlib as e:
            raise SystemExit(str(e)) from None
    if args.devices is not None:
        devices = [d.strip() for d in args.devices.split(",")]
        if args.only is not None or not all(devices) or len(set(devices)) != len(devices):
            raise SweepError(f"--devices {args.devices!r}: name distinct GPU ids, e.g. 0,1,2,3, "
                             "and no --only")
        outcomes = run_parallel(sweep, configs, devices)
    else:
        outcomes = run_sweep(sweep, configs, None if args.only is None else [args.only])
    finished = [o.run.run_dir for o in outcomes if o.status in ("done", "skipped")]
    failed = [o.run.name for o in outcomes if o.status == "failed"]
    stopped = any(o.status == "stopped" for o in outcomes)
    if args.only is None and finished and not stopped:
        _write_report(finished, sweep.report_dir, sweep.metrics, sweep.x)
    if stopped:
        raise SystemExit("sweep stopped by a signal: run the same command to resume it")
    if failed:
        raise SystemExit(f"sweep: {len(failed)} of {len(outcomes)} runs failed: "
                         f"{', '.join(failed)} (see train.log in their run directories)")


def cmd_report(args) -> None:
    try:
        metrics = [MetricSpec.parse(m) for m in args.metrics]
        run_dirs = find_runs(args.runs)
    except ValueError as e:
        raise SystemExit(f"report: {e}") from None
    out = Path(args.out) if args.out else \
        Path(os.path.commonpath([d.parent.absolute() for d in run_dirs])) / "report"
    _write_report(run_dirs, out, metrics, args.x)


def add_sweep_commands(sub) -> None:
    """The `sweep` and `report` subcommands."""
    p = sub.add_parser("sweep", help="train the runs of a sweep file (a base config, a grid "
                       "and sets of overrides, seeds) one after another (or one per GPU with "
                       "--devices), skipping finished ones and resuming partial ones; then "
                       "tabulate and plot their results")
    p.add_argument("sweep", help="sweep file (YAML; see jaxkit/sweep/plan.py)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the runs, their overrides and whether done; run nothing")
    mode.add_argument("--print-commands", action="store_true",
                      help="print the `jaxkit train` command of each run and the report's")
    mode.add_argument("--slurm", metavar="FILE",
                      help="write a SLURM array script, one task per run (jaxkit sweep --only)")
    mode.add_argument("--only", type=int, metavar="INDEX",
                      help="run only the run numbered INDEX (as --dry-run lists them); no report")
    p.add_argument("--devices", metavar="IDS",
                   help="run side by side, one run per GPU of these ids (e.g. 0,1,2,3: each "
                   "run sees only its own, CUDA_VISIBLE_DEVICES); a run whose train.init_from "
                   "is another run of the sweep waits for it")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="a table (Markdown, CSV) of final metrics over seeds, "
                       "loss curves and a metric against a config knob, of run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or folders of them (a sweep's output folder)")
    p.add_argument("--out", help="folder to write to (default: report beside the runs)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                   help=f"[STAT:]SPLIT/KEY, e.g. eval/ce, median:train/tokens_per_second, "
                   f"tail:train/moe/*/max_mean_load (default: {' '.join(DEFAULT_METRICS)}); "
                   "the first is plotted against --x")
    p.add_argument("--x", metavar="KEY", help="config key (or 'run') to plot the first metric "
                   "against")
    p.set_defaults(func=cmd_report)
