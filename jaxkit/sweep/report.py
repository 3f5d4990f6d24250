"""Final metrics of training runs, read from their metrics.jsonl, as a table
(Markdown and CSV) with mean and standard deviation over the seeds of each
group of runs, and the report folder that adds the plots (jaxkit.sweep.plots).

A run's metrics.jsonl holds one record per logged step and split (train,
eval, compile). A resumed run logs again the steps after its checkpoint, so
the last record of a (split, step) is the one that counts.
"""
from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from jaxkit.sweep import plots

# What the sweep runner writes into each run directory: the run's name,
# label, seed, the overrides that tell it apart, its status.
RECORD = "sweep_run.json"
STATS = ("last", "tail", "mean", "min", "max", "median")
SPLITS = ("train", "eval")
# x: run plots a metric against the runs themselves (their labels)
RUN_AXIS = "run"


class ReportError(ValueError):
    """A run directory or metric that cannot be reported on."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested mappings -> {'a.b.c': value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def short_keys(keys) -> dict[str, str]:
    """Each dotted key -> its shortest dotted suffix that no other key shares."""
    keys = list(dict.fromkeys(keys))
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in keys):
                break
        out[key] = suffix
    return out


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """[STAT:]SPLIT/KEY: KEY of the SPLIT records (train or eval), e.g.
    eval/ce. A KEY with * (train/moe/*/max_mean_load) is the mean of the
    keys it matches at each step (over MoE layers, say). STAT reduces the
    logged steps: last (default), tail (mean of the last tenth of them),
    mean, min, max or median."""
    stat: str
    split: str
    key: str

    @classmethod
    def parse(cls, text) -> MetricSpec:
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not a metric (SPLIT/KEY, e.g. eval/ce)")
        stat, _, rest = text.rpartition(":")
        split, _, key = rest.partition("/")
        if stat and stat not in STATS:
            raise ValueError(f"{text!r}: unknown statistic {stat!r} (one of {', '.join(STATS)})")
        if split not in SPLITS or not key:
            raise ValueError(f"{text!r} is not SPLIT/KEY with SPLIT one of {', '.join(SPLITS)} "
                             "(e.g. eval/ce, train/loss)")
        return cls(stat or "last", split, key)

    def __str__(self) -> str:
        return ("" if self.stat == "last" else self.stat + ":") + f"{self.split}/{self.key}"

    def points(self, records: dict[str, dict[int, dict]]) -> list[tuple[int, float]]:
        """(step, its value) at each logged step of the run that has it."""
        points = []
        for step in sorted(records.get(self.split, {})):
            record = records[self.split][step]
            found = [v for k, v in record.items() if fnmatch.fnmatchcase(k, self.key)
                     and isinstance(v, (int, float)) and not isinstance(v, bool)]
            if found:
                points.append((step, sum(found) / len(found)))
        return points

    def value(self, records: dict[str, dict[int, dict]]) -> float | None:
        values = [v for _, v in self.points(records)]
        if not values:
            return None
        if self.stat == "last":
            return values[-1]
        if self.stat == "tail":
            values = values[-max(len(values) // 10, 1):]
        reduce = {"tail": statistics.fmean, "mean": statistics.fmean, "min": min, "max": max,
                  "median": statistics.median}[self.stat]
        return float(reduce(values))


def read_metrics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """split -> step -> record, the last record of each (split, step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    records: dict[str, dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a killed run was writing
            continue
        records.setdefault(record["split"], {})[record["step"]] = record
    return records


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_dir: Path
    label: str
    seed: int
    varied: dict[str, Any]
    config: dict[str, Any]  # flattened resolved config
    records: dict[str, dict[int, dict]]


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir: str | Path) -> RunResult:
    """A run directory's metrics, config and (from a sweep's record, else its
    directory name and train.seed) label, seed and what tells it apart."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config = flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    record = read_record(run_dir)
    if record is None:
        return RunResult(run_dir, run_dir.name, config.get("train.seed", 0), {}, config, records)
    return RunResult(run_dir, record["label"], record["seed"], record["varied"], config, records)


def find_runs(paths) -> list[Path]:
    """The run directories among paths, and those directly inside the paths
    that are not runs themselves (a sweep's output folder)."""
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()) \
            if path.is_dir() else []
        if not inside:
            raise ReportError(f"{path} is neither a run directory nor a folder of runs "
                              "(no metrics.jsonl)")
        runs += inside
    return runs


@dataclasses.dataclass(frozen=True)
class Row:
    """One group of runs: those of one label, over their seeds."""
    label: str
    varied: dict[str, Any]
    runs: tuple[RunResult, ...]
    values: dict[str, list[float]]  # str(spec) -> each run's value (runs lacking it left out)

    def mean_std(self, spec: MetricSpec) -> tuple[float | None, float | None]:
        values = self.values[str(spec)]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(runs: list[RunResult], specs) -> list[Row]:
    """Rows in the order the labels first appear."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    rows = []
    for label, members in groups.items():
        values = {str(s): [v for r in members if (v := s.value(r.records)) is not None]
                  for s in specs}
        rows.append(Row(label, members[0].varied, tuple(members), values))
    return rows


def format_number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) >= 0.01 else f"{value:.4g}"


def _varied_keys(rows: list[Row]) -> list[str]:
    """The swept keys, as table columns; a list entry's name is the row label
    already."""
    return list(dict.fromkeys(k for row in rows for k in row.varied if k != RUN_AXIS))


def markdown_table(rows: list[Row], specs) -> str:
    """Mean ± standard deviation over each group's seeds (n: how many runs)."""
    keys = _varied_keys(rows)
    short = short_keys(keys)
    header = ["run", *(short[k] for k in keys), "n", *map(str, specs)]
    lines = ["| " + " | ".join(header) + " |",
             "| --- |" + " --- |" * len(keys) + " ---: |" + " ---: |" * len(specs)]
    for row in rows:
        cells = [row.label, *(str(row.varied.get(k, "-")) for k in keys), str(len(row.runs))]
        for spec in specs:
            mean, std = row.mean_std(spec)
            cells.append(format_number(mean) + ("" if std is None else f" ± {format_number(std)}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], specs, path: Path) -> None:
    keys = _varied_keys(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, "seeds", *(c for s in specs for c in (str(s), f"{s} std"))])
        for row in rows:
            cells = [row.label, *(row.varied.get(k, "") for k in keys),
                     " ".join(str(r.seed) for r in row.runs)]
            for spec in specs:
                cells += ["" if v is None else v for v in row.mean_std(spec)]
            writer.writerow(cells)


def _x_value(run: RunResult, x: str):
    return run.label if x == RUN_AXIS else run.config.get(x)


def _series_keys(rows: list[Row], x: str) -> list[str]:
    """The varied keys that split the rows into lines: those other than x
    whose value x does not decide (a schedule's own min_lr_ratio, say)."""
    keys = []
    for key in _varied_keys(rows):
        seen: dict = {}
        if key != x and any(seen.setdefault(str(_x_value(r.runs[0], x)), r.varied.get(key))
                            != r.varied.get(key) for r in rows):
            keys.append(key)
    return keys


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def write_report(runs: list[RunResult], out: Path, specs, x: str | None = None) -> list[Path]:
    """out/table.md and table.csv (specs over each group's seeds),
    loss_curves.png (train and eval cross-entropy of every run) and, with x,
    <first spec>_vs_<x>.png. Returns the files written."""
    plots.pyplot()  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs, specs)
    written = [out / "table.md", out / "table.csv", out / "loss_curves.png"]
    written[0].write_text(markdown_table(rows, specs))
    write_csv(rows, specs, written[1])
    panels = {}
    for split in SPLITS:
        spec = MetricSpec("last", split, "ce")
        panels[f"{split} cross-entropy"] = {
            row.label: [tuple(zip(*spec.points(r.records))) or ((), ()) for r in row.runs]
            for row in rows}
    plots.plot_curves(panels, written[2])
    if x is not None:
        spec, keys = specs[0], _series_keys(rows, x)
        short = short_keys(keys)
        series: dict[str, list] = {}
        for row in rows:
            mean, std = row.mean_std(spec)
            if mean is not None:
                name = ",".join(f"{short[k]}={row.varied.get(k, '-')}" for k in keys)
                series.setdefault(name, []).append((_x_value(row.runs[0], x), mean, std))
        written.append(out / f"{_slug(str(spec))}_vs_{_slug(x)}.png")
        plots.plot_against(series, x, str(spec), written[-1])
    return written
