"""The table of the long-context retrieval sweep: MQAR accuracy and loss of
each run against the share of causal key blocks its sparse layers keep and
the attention FLOP speed-up that share bounds (budget.py); with --measured,
also the training step's speed-up over the dense run of the same length
(median tokens/s: a GPU figure; on a CPU the sparse op builds the dense
mask). Rows by sequence length, in the sweep's order. The plot
(accuracy_speedup.png) draws each policy's eval accuracy, and with
--measured its step speed-up, against the length.

    jaxkit sweep experiments/long_context_retrieval/sweep.yaml
    python -m experiments.long_context_retrieval.analysis [--sweep FILE] [--out DIR] [--measured]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.long_context_retrieval.budget import (attention_speedup_bound, describe,
                                                       kept_fraction)
from jaxkit.config import load_config
from jaxkit.sweep.plan import load_sweep
from jaxkit.sweep.plots import pyplot
from jaxkit.sweep.report import read_metrics

HERE = Path(__file__).parent


def summarize(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    records = read_metrics(run_dir)
    evals = records.get("eval", {})
    final = evals[max(evals)] if evals else {}
    train = records.get("train", {})
    speeds = [r["tokens_per_second"] for r in train.values() if "tokens_per_second" in r]
    S = cfg.data.seq_len
    return {"policy": describe(cfg.model), "seq_len": S, "steps": max(train) if train else 0,
            "init_from": cfg.train.init_from,
            "kept": kept_fraction(cfg.model, S),
            "speedup_bound": attention_speedup_bound(cfg.model, S),
            "tokens_per_second": float(np.median(speeds)) if speeds else None,
            "eval_accuracy": final.get("accuracy"), "eval_ce": final.get("ce"),
            "train_ce": train[max(train)]["ce"] if train else None}


def add_measured_speedups(results: dict) -> None:
    """Sets each run's step_speedup: its tokens/s over the dense run's of the
    same length (None without both)."""
    dense = {}
    for r in results.values():
        if r["policy"] == "dense" and r["tokens_per_second"]:
            dense.setdefault(r["seq_len"], r["tokens_per_second"])
    for r in results.values():
        base = dense.get(r["seq_len"])
        r["step_speedup"] = r["tokens_per_second"] / base \
            if base and r["tokens_per_second"] else None


def _value(x, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def markdown(results: dict, measured: bool = False) -> str:
    """The table; measured: with the step speed-up column."""
    head = ["tokens", "run", "policy", "kept causal blocks", "attention FLOP speed-up bound"]
    head += ["step speed-up (measured)"] * measured + ["eval accuracy", "eval CE"]
    aligns = ["---:", "---", "---"] + ["---:"] * (len(head) - 3)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(aligns) + " |"]
    by_length = sorted(results.items(), key=lambda item: item[1]["seq_len"])  # stable
    for name, r in by_length:
        cells = [f"{r['seq_len']:,}", name, r["policy"], f"{100 * r['kept']:.1f}%",
                 f"{r['speedup_bound']:.2f}x"]
        cells += [_value(r["step_speedup"], ".2f", "x")] * measured
        cells += [_value(r["eval_accuracy"], ".3f"), _value(r["eval_ce"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, measured: bool = False) -> None:
    """One line per policy kind (its runs ordered by length): eval accuracy
    against tokens, and with measured the step speed-up over dense."""
    plt = pyplot()
    arms: dict[str, list[dict]] = {}
    for r in results.values():
        arms.setdefault(r["policy"].split(",")[0], []).append(r)
    keys = ["eval_accuracy"] + ["step_speedup"] * measured
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, runs in arms.items():
            points = sorted((r["seq_len"], r[key]) for r in runs if r[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("eval accuracy" if key == "eval_accuracy" else "step speed-up over dense")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", default=str(HERE / "sweep.yaml"))
    p.add_argument("--out", default=str(HERE), help="folder for results.table.md and results.json")
    p.add_argument("--measured", action="store_true",
                   help="add the measured step speed-up over dense (runs on a GPU)")
    args = p.parse_args(argv)
    runs = [r for r in load_sweep(args.sweep).runs if (r.run_dir / "metrics.jsonl").exists()]
    if not runs:
        raise SystemExit(f"no runs of {args.sweep} with metrics yet: jaxkit sweep {args.sweep}")
    results = {r.label: summarize(r.run_dir) for r in runs}
    add_measured_speedups(results)
    table = markdown(results, args.measured)
    print(table, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.table.md").write_text(table)
    plot(results, out / "accuracy_speedup.png", args.measured)


if __name__ == "__main__":
    main()
