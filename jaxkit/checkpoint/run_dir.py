"""The checks a training run makes on its run directory before it builds
anything: one training process at a time holds it, a fresh start never
mixes with an earlier run's checkpoints and metrics, --restart deletes them
only from a jaxkit run directory, and a resume refuses a config that
changes the structure of the saved state, naming the keys."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import yaml

from jaxkit.config import Config, ConfigError, to_dict

CONFIG = "config.yaml"
LOCK = ".lock"  # held by the training process that owns the run directory
# What a training run writes (trainer, metrics logger, profiler); --restart
# deletes these and nothing else.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "profile", "profile.json")

# Config keys a resume may change: they decide how training goes on, not the
# structure of the saved state (parameter shapes, model state, optimizer
# state). Every other key must match the saved config. A dotted prefix
# ending in '.' allows a whole section.
RESUMABLE = (
    "train.",  # steps, seed, logging, eval cadence, out_dir/run_name, progress...
    "data.",  # paths and batches: the data never enters the checkpoint
    "mesh.",  # checkpoints hold global arrays, restored onto any mesh
    "checkpoint.",  # save cadence and retention
    "generate.",  # text generation settings: never read by training
    "model.remat", "model.compute_dtype", "model.attention.implementation",  # no parameters
    "optimizer.learning_rate", "optimizer.schedule", "optimizer.warmup_steps",
    "optimizer.decay_fraction", "optimizer.min_lr_ratio",  # the schedule: a function of the step
    "optimizer.b1", "optimizer.b2", "optimizer.eps",  # values inside the update rule
)
# Values may change, but not to or from off (null / 0): that adds or removes
# an optimizer stage (gradient clipping; adafactor's weight decay).
RESUMABLE_UNLESS_OFF = ("optimizer.clip_norm", "optimizer.weight_decay")


class RunExistsError(FileExistsError):
    """A fresh start into a run directory that holds an earlier run's output."""


def _try_lock(f) -> str | None:
    """Takes the lock of the open lock file f; None when taken, else the
    holder's pid as the file names it."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "unknown"


def holder(run_dir: Path) -> str | None:
    """The pid of the training process that holds run_dir, or None."""
    if not (run_dir / LOCK).is_file():
        return None
    with open(run_dir / LOCK, "a+") as f:
        return _try_lock(f)  # closing the file releases a lock taken here


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Holds run_dir's lock for the block, so a second training process on
    the same directory (a sweep started twice, a resume while the run goes
    on) is refused, naming the holder's pid, instead of mixing its
    checkpoints and metrics with this one's. The lock (flock) ends with its
    process: a killed run leaves none behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        pid = _try_lock(f)
        if pid is not None:
            raise RunExistsError(f"{run_dir} is in use by another training process (pid "
                                 f"{pid}): wait for it to end, or stop it")
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _may_differ(key: str, old, new) -> bool:
    if key in RESUMABLE_UNLESS_OFF:
        return bool(old) == bool(new)
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def structural_differences(saved: dict, cfg: Config) -> list[str]:
    """'key (saved, now)' for each key of cfg that differs from the saved
    config (a plain dict, as config.yaml holds it) in a way that changes the
    checkpoint's structure. Keys the saved config lacks (added to jaxkit
    since) count as their defaults."""
    old = _flatten(to_dict(Config())) | _flatten(saved)
    new = _flatten(to_dict(cfg))
    return [f"{key} ({old.get(key)}, now {new.get(key)})" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not _may_differ(key, old.get(key), new.get(key))]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints in run_dir/checkpoints, ascending (none: [])."""
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.is_dir() else []


def check_resume(cfg: Config, run_dir: Path) -> None:
    """ConfigError naming the keys when cfg changes the structure of the
    state the run in run_dir saved (nothing to check without its config.yaml)."""
    saved = run_dir / CONFIG
    if not saved.is_file():
        return
    differences = structural_differences(yaml.safe_load(saved.read_text()) or {}, cfg)
    if differences:
        raise ConfigError(f"--resume: the run in {run_dir} was saved with a different "
                          + ", ".join(differences) + "; these change the checkpoint's structure "
                          "(train into another run directory, or --restart)")


def check_fresh(run_dir: Path) -> None:
    """RunExistsError when run_dir holds an earlier run's checkpoints or metrics."""
    steps = checkpoint_steps(run_dir)
    if steps or (run_dir / "metrics.jsonl").exists():
        held = f"checkpoints up to step {steps[-1]}" if steps else "metrics"
        raise RunExistsError(f"{run_dir} already holds a run ({held}): pass --resume to continue "
                             "it, or --restart to delete its checkpoints and metrics and start over")


def clear_run(run_dir: Path) -> None:
    """Deletes the outputs of the earlier run in run_dir (RUN_OUTPUTS), after
    checking that it is a jaxkit run directory (its config.yaml is a config)."""
    if not any((run_dir / name).exists() for name in RUN_OUTPUTS):
        return
    try:
        saved = yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not (isinstance(saved, dict) and {"model", "train"} <= saved.keys()):
        raise RunExistsError(f"--restart: {run_dir} is not a jaxkit run directory (no readable "
                             f"{CONFIG}); delete its files yourself")
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
