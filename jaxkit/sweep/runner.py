"""Runs a sweep's runs one after another, each as a `jaxkit train`
subprocess: a run that fails (an error, a crash, running out of memory)
takes nothing of the sweep or of the other runs with it, and each run starts
with fresh device memory. Every run is started with --resume, so a partial
run goes on from its newest intact checkpoint, as `jaxkit train --resume` does.

Each run directory gets RECORD (jaxkit.sweep.report): the run's name,
overrides and seed, the command, and its status; the subprocess's output
goes to train.log. A run is done when its metrics reach train.steps under
the config the sweep resolves for it now; done runs are skipped.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from jaxkit.config import Config, to_dict
from jaxkit.sweep.plan import Run, Sweep
from jaxkit.sweep.report import RECORD, flatten, read_metrics, read_record

LOG = "train.log"
# a run's state before the sweep runs it; every state but done runs (again)
STATES = ("done", "changed", "failed", "stopped", "partial", "pending")


@dataclasses.dataclass(frozen=True)
class Outcome:
    run: Run
    status: str  # skipped (done before), done, failed, stopped (by a signal)
    seconds: float = 0.0
    error: str | None = None

    def ending(self) -> str:
        """How the run ended, for the sweep's log: 'failed in 12 s: <error>'."""
        return f"{self.status} in {self.seconds:.0f} s" + (f": {self.error}" if self.error else "")


def train_args(sweep: Sweep, run: Run) -> list[str]:
    """The `jaxkit train` arguments of a run."""
    sets = [a for override in run.overrides for a in ("--set", override)]
    return ["train", str(sweep.base), *sets, "--run-dir", str(run.run_dir), "--resume"]


def finished(run: Run, cfg: Config) -> bool:
    """Whether the run's metrics reach train.steps with the config it saved
    being cfg (keys it lacks, added to jaxkit since, count as their defaults)."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return False
    saved = flatten(to_dict(Config())) | flatten(yaml.safe_load(path.read_text()) or {})
    if any(saved.get(key) != value for key, value in flatten(to_dict(cfg)).items()):
        return False
    train = read_metrics(run.run_dir).get("train", {}) \
        if (run.run_dir / "metrics.jsonl").is_file() else {}
    return max(train, default=0) >= cfg.train.steps


def run_state(run: Run, cfg: Config) -> str:
    """done; changed (done under another config: it resumes under this one);
    failed or stopped (its last attempt); partial (begun elsewhere, or the
    sweep was killed); pending."""
    record = read_record(run.run_dir) or {}
    status = record.get("status")
    if status in ("failed", "stopped"):
        return status
    if finished(run, cfg):
        return "done"
    if status == "done":
        return "changed"
    begun = (run.run_dir / "metrics.jsonl").exists() or (run.run_dir / "checkpoints").exists()
    return "partial" if begun or status == "running" else "pending"


def _write_record(run: Run, record: dict) -> None:
    path = run.run_dir / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def _wait(proc: subprocess.Popen) -> tuple[int, bool]:
    """Waits for the run's process, passing SIGINT and SIGTERM on to it (the
    trainer saves a checkpoint and stops); returns (exit status, whether a
    signal came)."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait(), bool(received)
            except InterruptedError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _last_line(path: Path) -> str | None:
    lines = [line.rsplit("\r", 1)[-1].strip() for line in path.read_text(errors="replace")
             .splitlines()]
    return next((line for line in reversed(lines) if line), None)


def run_one(sweep: Sweep, run: Run, cfg: Config, *, device: str | None = None,
            wait: Callable[[subprocess.Popen], tuple[int, bool]] = _wait) -> Outcome:
    """Trains one run in a subprocess (on GPU `device` alone when given:
    CUDA_VISIBLE_DEVICES); records and returns how it ended. wait(proc) ->
    (exit status, whether a signal stopped it). A run directory another
    training process holds (another sweep's run) is left alone: failed."""
    from jaxkit.checkpoint.run_dir import holder  # the checkpoint package imports jax
    pid = holder(run.run_dir)
    if pid is not None:
        return Outcome(run, "failed", error=f"{run.run_dir} is in use by another training "
                                            f"process (pid {pid})")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jaxkit.cli", *train_args(sweep, run)]
    record = {"sweep": str(sweep.path), "index": run.index, "name": run.name, "label": run.label,
              "seed": run.seed, "varied": run.varied, "overrides": list(run.overrides),
              "command": shlex.join(command), "status": "running",
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    env = None
    if device is not None:
        record["device"] = device
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
    _write_record(run, record)
    log = run.run_dir / LOG
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {record['command']}\n")
        out.flush()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        returncode, signalled = wait(proc)
    seconds = time.perf_counter() - start
    if returncode == 0 and finished(run, cfg):
        status, error = "done", None
    elif signalled or returncode == 0:  # the trainer stops early only on a signal
        status, error = "stopped", "stopped by a signal"
    else:
        status, error = "failed", _last_line(log) or f"exit status {returncode}"
    _write_record(run, record | {"status": status, "returncode": returncode,
                                 "seconds": round(seconds, 1), "error": error})
    return Outcome(run, status, seconds, error)


def run_sweep(sweep: Sweep, configs: list[Config], indices=None,
              log: Callable[[str], None] = print) -> list[Outcome]:
    """Runs the sweep's runs (those at indices, default all) in order,
    skipping done ones; a failed run is recorded and the next one starts; a
    stopped run (SIGINT, SIGTERM) stops the sweep."""
    chosen = [sweep.runs[i] for i in (range(len(sweep.runs)) if indices is None else indices)]
    outcomes = []
    for k, run in enumerate(chosen, 1):
        cfg = configs[run.index]
        prefix = f"[{k}/{len(chosen)}] {run.name}"
        state = run_state(run, cfg)
        if state == "done":
            log(f"{prefix}: done before, skipped")
            outcomes.append(Outcome(run, "skipped"))
            continue
        log(f"{prefix}: {'resuming' if state != 'pending' else 'starting'} (log: "
            f"{run.run_dir / LOG})")
        outcome = run_one(sweep, run, cfg)
        outcomes.append(outcome)
        log(f"{prefix}: {outcome.ending()}")
        if outcome.status == "stopped":
            break
    return outcomes


def _shared(sweep: Sweep) -> list[str]:
    """The overrides every run has."""
    return [o for o in sweep.runs[0].overrides if all(o in r.overrides for r in sweep.runs)]


def plan_text(sweep: Sweep, configs: list[Config]) -> str:
    """The runs, their own overrides and their states."""
    states = [run_state(run, cfg) for run, cfg in zip(sweep.runs, configs)]
    shared = _shared(sweep)
    counts = ", ".join(f"{states.count(s)} {s}" for s in STATES if s in states)
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs of {sweep.base} in {sweep.out} "
             f"({counts})"]
    if shared:
        lines.append("every run: " + " ".join(shared))
    width = max(len(r.name) for r in sweep.runs)
    for run, state in zip(sweep.runs, states):
        own = " ".join(o for o in run.overrides if o not in shared)
        lines.append(f"{run.index:>4}  {state:<8} {run.name:<{width}}  {own}")
    return "\n".join(lines)


def report_command(sweep: Sweep) -> list[str]:
    """The `jaxkit report` command of the sweep's runs, named one by one: an
    output folder may hold other sweeps' runs too (shared baselines)."""
    x = ["--x", sweep.x] if sweep.x else []
    return ["jaxkit", "report", *(str(r.run_dir) for r in sweep.runs),
            "--out", str(sweep.report_dir), "--metrics", *map(str, sweep.metrics), *x]


def shell_commands(sweep: Sweep) -> str:
    """The `jaxkit train` command of each run, then the report's."""
    lines = []
    for run in sweep.runs:
        lines += [f"# {run.index}: {run.name}", shlex.join(["jaxkit", *train_args(sweep, run)])]
    lines += ["# the table and plots of the finished runs", shlex.join(report_command(sweep))]
    return "\n".join(lines) + "\n"


def slurm_script(sweep: Sweep) -> str:
    """A SLURM array job with one task per run: `jaxkit sweep --only INDEX`."""
    out = sweep.out.resolve()
    return "\n".join([
        "#!/bin/bash",
        f"# Sweep {sweep.name} ({sweep.path}): {len(sweep.runs)} runs, one array task each.",
        "# A task skips its run when done and resumes it from its checkpoint when partial.",
        f"# When all are done: {shlex.join(report_command(sweep))}",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=0-{len(sweep.runs) - 1}",
        f"#SBATCH --output={out}/slurm-%A_%a.log",
        *(f"#SBATCH {option}" for option in sweep.slurm),
        f"cd {shlex.quote(os.getcwd())}",
        f'jaxkit sweep {shlex.quote(str(sweep.path))} --only "$SLURM_ARRAY_TASK_ID"',
        ""])
