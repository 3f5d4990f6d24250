"""A sweep file read, checked and expanded into its runs.

    name: lr_schedules            # default: the file's folder (for sweep.yaml) or stem
    base: configs/gpt_125m.yaml   # relative to the sweep file, else to the current folder
    out: runs/lr_schedules        # the run directories' parent (default runs/<name>)
    set: {train.steps: 2000}      # overrides of every run
    grid:                         # cartesian product of these values
      optimizer.learning_rate: [3.0e-4, 6.0e-4]
    runs:                         # override sets, each crossed with the grid
      - {optimizer.schedule: cosine, seeds: [0, 1]}
      - {name: d2z, optimizer.schedule: linear, optimizer.min_lr_ratio: 0}
    seeds: [0]                    # default [0]; a run entry may give its own
    seed_keys: [train.seed]       # the config keys a seed sets (default train.seed)
    report:
      metrics: [eval/ce, train/loss]   # see jaxkit.sweep.report.MetricSpec
      x: optimizer.learning_rate       # the knob the first metric is plotted against
      out: runs/lr_schedules/report    # default <out>/report
    slurm: ["--gres=gpu:1"]       # #SBATCH lines of --slurm scripts

A run's directory is <out>/<what tells it apart>_seed<S>, where what tells
it apart is its entry's name, or its entry's and grid point's overrides as
key=value joined by commas (keys shortened to their shortest unambiguous
dotted suffix). Runs are numbered in the order entries x grid points x seeds.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from jaxkit.config import Config, ConfigError, load_config, to_dict
from jaxkit.sweep.report import RUN_AXIS, MetricSpec, flatten, short_keys

SWEEP_KEYS = ("name", "base", "out", "set", "grid", "runs", "seeds", "seed_keys", "report", "slurm")
REPORT_KEYS = ("metrics", "x", "out")
ENTRY_KEYS = ("name", "seeds")  # the keys of a runs entry that are not config keys
DEFAULT_METRICS = ("eval/ce", "train/loss")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][\w.+=-]*")


class SweepError(ConfigError):
    """A sweep file that cannot be run: names the file, the key and the value."""


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str  # its directory's name
    label: str  # the name without the seed: runs that differ only by seed share it
    varied: dict[str, Any]  # what tells it apart: config key (or 'run': entry name) -> value
    overrides: tuple[str, ...]  # every KEY=VALUE given to `jaxkit train --set`, in order
    seed: int
    run_dir: Path


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    base: Path
    out: Path
    runs: tuple[Run, ...]
    metrics: tuple[MetricSpec, ...]
    x: str | None
    report_dir: Path
    slurm: tuple[str, ...]


def format_value(value) -> str:
    """value as `--set` takes it: text that YAML reads back as value."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and value else json.dumps(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _name_part(value) -> str:
    """value as it appears in a run directory's name."""
    if isinstance(value, (list, tuple)):
        return "+".join(_name_part(v) for v in value)
    text = value if isinstance(value, str) else format_value(value)
    return re.sub(r"[^\w.+-]", "_", text)


def _default_name(path: Path) -> str:
    return path.parent.resolve().name if path.stem == "sweep" else path.stem


def _fail(path: Path, what: str) -> SweepError:
    return SweepError(f"{path}: {what}")


def _mapping(path: Path, value, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{key}: expected a mapping of config keys to values, got {value!r}")
    for k in value:
        if not isinstance(k, str) or not k:
            raise _fail(path, f"{key}: {k!r} is not a config key")
    return dict(value)


def _seeds(path: Path, value, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise _fail(path, f"{key}: expected a non-empty list of integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(path, f"{key}: {value!r} repeats a seed")
    return tuple(value)


def _entries(path: Path, raw, seeds) -> list[tuple[str | None, dict, tuple[int, ...]]]:
    """(name, overrides, seeds) of each runs entry; one empty entry without runs."""
    if raw is None:
        return [(None, {}, seeds)]
    if not isinstance(raw, list) or not raw:
        raise _fail(path, f"runs: expected a non-empty list of override sets, got {raw!r}")
    entries = []
    for i, entry in enumerate(raw):
        entry = _mapping(path, entry, f"runs[{i}]")
        name = entry.pop("name", None)
        if name is not None and not (isinstance(name, str) and _SAFE_NAME.fullmatch(name)):
            raise _fail(path, f"runs[{i}].name: {name!r} is not a directory name (letters, "
                        "digits and . _ + = -)")
        own = _seeds(path, entry.pop("seeds"), f"runs[{i}].seeds") if "seeds" in entry else seeds
        entries.append((name, entry, own))
    return entries


def _grid(path: Path, raw) -> list[dict]:
    grid = _mapping(path, raw, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid.{key}: expected a non-empty list of values, got {values!r}")
    return [dict(zip(grid, point)) for point in itertools.product(*grid.values())]


def _report(path: Path, raw, out: Path) -> tuple[tuple[MetricSpec, ...], str | None, Path]:
    report = raw or {}
    if not isinstance(report, dict):
        raise _fail(path, f"report: expected a mapping, got {report!r}")
    unknown = set(report) - set(REPORT_KEYS)
    if unknown:
        raise _fail(path, f"report: unknown key {sorted(unknown)[0]!r} (valid: "
                    f"{', '.join(REPORT_KEYS)})")
    metrics = report.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(metrics, list) or not metrics:
        raise _fail(path, f"report.metrics: expected a non-empty list, got {metrics!r}")
    try:
        specs = tuple(MetricSpec.parse(m) for m in metrics)
    except ValueError as e:
        raise _fail(path, f"report.metrics: {e}") from None
    x = report.get("x")
    if x is not None and not isinstance(x, str):
        raise _fail(path, f"report.x: expected a config key or {RUN_AXIS!r}, got {x!r}")
    return specs, x, Path(report.get("out", out / "report"))


def _find_base(path: Path, base) -> Path:
    if not isinstance(base, str) or not base:
        raise _fail(path, f"base: expected the path of a config file, got {base!r}")
    for candidate in (path.parent / base, Path(base)):
        if candidate.is_file():
            try:  # as short as it can be, for the commands and the plan
                return candidate.resolve().relative_to(Path.cwd().resolve())
            except ValueError:
                return candidate
    raise _fail(path, f"base: {base!r} is neither beside the sweep file nor under the current "
                "folder")


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file at path, expanded into its runs (configs not yet loaded:
    see resolve)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _fail(path, f"invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "the top level must be a mapping")
    unknown = set(raw) - set(SWEEP_KEYS)
    if unknown:
        raise _fail(path, f"unknown key {sorted(unknown)[0]!r} (valid: {', '.join(SWEEP_KEYS)})")
    if "base" not in raw:
        raise _fail(path, "base: missing (the config file the runs start from)")
    name = raw.get("name", _default_name(path))
    if not (isinstance(name, str) and _SAFE_NAME.fullmatch(name)):
        raise _fail(path, f"name: {name!r} is not a directory name")
    out = Path(raw.get("out", Path("runs") / name))
    seeds = _seeds(path, raw.get("seeds", [0]), "seeds")
    seed_keys = raw.get("seed_keys", ["train.seed"])
    if not isinstance(seed_keys, list) or not seed_keys or not all(
            isinstance(k, str) for k in seed_keys):
        raise _fail(path, f"seed_keys: expected a non-empty list of config keys, got {seed_keys!r}")
    common = _mapping(path, raw.get("set"), "set")
    entries = _entries(path, raw.get("runs"), seeds)
    points = _grid(path, raw.get("grid"))
    grid_keys = set(points[0])
    for i, (_, entry, _) in enumerate(entries):
        for key in entry:
            if key in grid_keys:
                raise _fail(path, f"runs[{i}].{key}: also a grid key (give it in one place)")
    short = short_keys([k for _, entry, _ in entries for k in entry] + list(grid_keys))
    runs = []
    for (entry_name, entry, entry_seeds), point in itertools.product(entries, points):
        varied = ({RUN_AXIS: entry_name} if entry_name else dict(entry)) | point
        parts = [entry_name] if entry_name else []
        parts += [f"{short[k]}={_name_part(v)}" for k, v in
                  (point.items() if entry_name else (entry | point).items())]
        label = ",".join(parts) or "base"
        for seed in entry_seeds:
            overrides = {**common, **entry, **point, **{k: seed for k in seed_keys}}
            runs.append(Run(index=len(runs), name=f"{label}_seed{seed}", label=label,
                            varied=varied, seed=seed,
                            overrides=tuple(f"{k}={format_value(v)}" for k, v in overrides.items()),
                            run_dir=out / f"{label}_seed{seed}"))
    names = {}
    for run in runs:
        if run.name in names:
            raise _fail(path, f"runs {names[run.name]} and {run.index} would share the run "
                        f"directory {run.name!r}: name the entries")
        names[run.name] = run.index
    specs, x, report_dir = _report(path, raw.get("report"), out)
    slurm = raw.get("slurm", [])
    if not isinstance(slurm, list) or not all(isinstance(s, str) for s in slurm):
        raise _fail(path, f"slurm: expected a list of sbatch options, got {slurm!r}")
    return Sweep(path=path, name=name, base=_find_base(path, raw["base"]), out=out,
                 runs=tuple(runs), metrics=specs, x=x, report_dir=report_dir, slurm=tuple(slurm))


def resolve(sweep: Sweep, check: Callable[[Config], None] | None = None) -> list[Config]:
    """Each run's config, loaded from the base and its overrides (and passed
    to check, if given): a bad key or value is a SweepError naming the sweep
    file and the run, before any run starts."""
    configs = []
    for run in sweep.runs:
        try:
            cfg = load_config(sweep.base, list(run.overrides))
            if check is not None:
                check(cfg)
        except ConfigError as e:
            raise _fail(sweep.path, f"run {run.index} ({run.name}): {e}") from None
        configs.append(cfg)
    if sweep.x is not None and sweep.x != RUN_AXIS and sweep.x not in flatten(to_dict(configs[0])):
        raise _fail(sweep.path, f"report.x: {sweep.x!r} is not a config key (or {RUN_AXIS!r})")
    return configs
