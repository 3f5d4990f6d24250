"""`jaxkit sweep --devices 0,1,...`: a sweep's runs side by side, one per
GPU (each subprocess sees only its own: CUDA_VISIBLE_DEVICES), a device
taking the next runnable run as soon as its last one ends.

A run whose train.init_from is another run of the sweep starts only once
that run is done (and is recorded as failed without starting when that run
fails or stops), so a chain of runs keeps its order while independent runs
fill the devices. SIGINT or SIGTERM goes to every running run (each saves
a checkpoint and stops) and no new run starts; the same command resumes.
"""
from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable

from jaxkit.config import Config
from jaxkit.sweep.plan import Run, Sweep
from jaxkit.sweep.runner import Outcome, run_one, run_state


def _source(run: Run, cfg: Config, by_dir: dict[Path, int]) -> int | None:
    """The index of the sweep run whose checkpoint `run` starts from, if any."""
    init = cfg.train.init_from
    index = None if init is None else by_dir.get(Path(init).resolve())
    return None if index == run.index else index


class _Schedule:
    """The runs left, what each waits for, and the outcomes so far; every
    method is called under `lock`."""

    def __init__(self, runs: list[Run], sources: dict[int, int | None]):
        self.todo, self.sources = list(runs), sources
        self.outcomes: dict[int, Outcome] = {}
        self.lock = threading.Condition()
        self.stopping = False

    def take(self) -> Run | None:
        """The next run whose source is done, removed from the runs left;
        None when there is none yet. A run whose source failed or stopped is
        recorded as failed here, without starting."""
        for run in list(self.todo):
            source = self.sources[run.index]
            ended = self.outcomes.get(source) if source is not None else None
            if source is not None and ended is None:
                continue  # its source is still to run, or running
            self.todo.remove(run)
            if ended is not None and ended.status not in ("done", "skipped"):
                self.outcomes[run.index] = Outcome(
                    run, "failed", error=f"its train.init_from run {ended.run.name} {ended.status}")
                self.lock.notify_all()
                continue
            return run
        return None


def run_parallel(sweep: Sweep, configs: list[Config], devices: list[str],
                 log: Callable[[str], None] = print) -> list[Outcome]:
    """Runs the sweep's runs that are not done, up to one per device at a
    time; returns every run's outcome in the sweep's order."""
    by_dir = {run.run_dir.resolve(): run.index for run in sweep.runs}
    schedule = _Schedule([], {r.index: _source(r, configs[r.index], by_dir) for r in sweep.runs})
    for run in sweep.runs:
        if run_state(run, configs[run.index]) == "done":
            log(f"{run.name}: done before, skipped")
            schedule.outcomes[run.index] = Outcome(run, "skipped")
        else:
            schedule.todo.append(run)
    live: set[subprocess.Popen] = set()
    started = []

    def wait(proc):
        with schedule.lock:
            live.add(proc)
        try:
            return proc.wait(), schedule.stopping
        finally:
            with schedule.lock:
                live.discard(proc)

    def worker(device: str):
        while True:
            with schedule.lock:
                run = None
                while run is None:
                    if schedule.stopping or not schedule.todo:
                        return
                    run = schedule.take()
                    if run is None:
                        schedule.lock.wait()
                started.append(run)
                log(f"[{len(started)}] {run.name}: starting on device {device}")
            outcome = run_one(sweep, run, configs[run.index], device=device, wait=wait)
            log(f"{run.name}: {outcome.ending()}")
            with schedule.lock:
                schedule.outcomes[run.index] = outcome
                schedule.lock.notify_all()

    def forward(signum, frame):
        with schedule.lock:
            schedule.stopping = True
            for proc in live:
                proc.send_signal(signum)
            schedule.lock.notify_all()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short joins: the main thread must stay free to take signals
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for run in schedule.todo:  # not started: the sweep was stopped
        schedule.outcomes[run.index] = Outcome(run, "stopped", error="not started")
    return [schedule.outcomes[i] for i in sorted(schedule.outcomes)]
