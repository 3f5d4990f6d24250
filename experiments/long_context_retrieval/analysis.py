"""The table of the long-context retrieval sweep: MQAR accuracy and loss of
each run against the share of causal key blocks its sparse layers keep and
the attention FLOP speed-up that share bounds (budget.py).

    jaxkit sweep experiments/long_context_retrieval/sweep.yaml
    python -m experiments.long_context_retrieval.analysis [--sweep FILE] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.long_context_retrieval.budget import (attention_speedup_bound, describe,
                                                       kept_fraction)
from jaxkit.config import load_config
from jaxkit.sweep.plan import load_sweep
from jaxkit.sweep.report import read_metrics

HERE = Path(__file__).parent


def summarize(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    records = read_metrics(run_dir)
    evals = records.get("eval", {})
    final = evals[max(evals)] if evals else {}
    train = records.get("train", {})
    S = cfg.data.seq_len
    return {"policy": describe(cfg.model), "seq_len": S, "steps": max(train) if train else 0,
            "kept": kept_fraction(cfg.model, S),
            "speedup_bound": attention_speedup_bound(cfg.model, S),
            "eval_accuracy": final.get("accuracy"), "eval_ce": final.get("ce"),
            "train_ce": train[max(train)]["ce"] if train else None}


def markdown(results: dict) -> str:
    lines = ["| run | policy | kept causal blocks | attention FLOP speed-up bound | "
             "eval accuracy | eval CE |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        acc = "-" if r["eval_accuracy"] is None else f"{r['eval_accuracy']:.3f}"
        ce = "-" if r["eval_ce"] is None else f"{r['eval_ce']:.3f}"
        lines.append(f"| {name} | {r['policy']} | {100 * r['kept']:.1f}% | "
                     f"{r['speedup_bound']:.2f}x | {acc} | {ce} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", default=str(HERE / "sweep.yaml"))
    p.add_argument("--out", default=str(HERE), help="folder for results.md and results.json")
    args = p.parse_args(argv)
    runs = [r for r in load_sweep(args.sweep).runs if (r.run_dir / "metrics.jsonl").exists()]
    if not runs:
        raise SystemExit(f"no runs of {args.sweep} with metrics yet: jaxkit sweep {args.sweep}")
    results = {r.label: summarize(r.run_dir) for r in runs}
    table = markdown(results)
    print(table, end="")
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.table.md").write_text(table)


if __name__ == "__main__":
    main()
