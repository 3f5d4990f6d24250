"""The comparison table of the attention implementations' runs (those of
sweep.yaml, or any run directories): train loss at shared logged steps,
final eval loss, and the median tokens/s and MFU over the logged intervals
after the first (which holds the first step's warm-up).

    jaxkit sweep experiments/attention_training/sweep.yaml
    python -m experiments.attention_training.analysis [RUN_DIR ...] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from jaxkit.sweep.plan import load_sweep
from jaxkit.sweep.report import read_metrics

SWEEP = Path(__file__).with_name("sweep.yaml")


def summarize(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    train = [records["train"][s] for s in sorted(records.get("train", {}))]
    evals = [records["eval"][s] for s in sorted(records.get("eval", {}))]
    steady = train[1:] or train
    return {
        "loss_by_step": {r["step"]: r["loss"] for r in train},
        "final_eval_loss": evals[-1]["ce"] if evals else None,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "mfu": statistics.median(r.get("mfu", 0.0) for r in steady),
    }


def markdown(results: dict) -> str:
    steps = sorted(set.intersection(*(set(r["loss_by_step"]) for r in results.values())))
    shown = sorted(set(steps[:: max(len(steps) // 6, 1)] + steps[-1:]))
    lines = ["| run | " + " | ".join(f"loss@{s}" for s in shown)
             + " | final eval loss | tokens/s | MFU |",
             "| --- |" + " --- |" * (len(shown) + 3)]
    for name, r in results.items():
        losses = " | ".join(f"{r['loss_by_step'][s]:.3f}" for s in shown)
        ev = "-" if r["final_eval_loss"] is None else f"{r['final_eval_loss']:.3f}"
        lines.append(f"| {name} | {losses} | {ev} | {r['tokens_per_second']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="*", help="run directories (default: sweep.yaml's)")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    run_dirs = [Path(r) for r in args.runs] or \
        [run.run_dir for run in load_sweep(SWEEP).runs if (run.run_dir / "metrics.jsonl").exists()]
    if not run_dirs:
        raise SystemExit(f"no runs of {SWEEP} with metrics yet: jaxkit sweep {SWEEP}")
    results = {d.name: summarize(d) for d in run_dirs}
    print(markdown(results), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
