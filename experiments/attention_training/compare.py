"""Compare training runs that differ only in attention implementation.

Reads runs/<prefix>_<impl>/metrics.jsonl and prints, per implementation, the
train loss at shared steps, final eval loss, median tokens/s and MFU (the
first logged interval, which includes compilation, is left out).

    python -m experiments.attention_training.compare --runs runs --prefix gpt125m xla pallas cudnn
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(records: list[dict]) -> dict:
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    steady = train[1:] or train
    return {
        "loss_by_step": {r["step"]: r["loss"] for r in train},
        "final_eval_loss": evals[-1]["ce"] if evals else None,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("implementations", nargs="+")
    p.add_argument("--runs", default="runs")
    p.add_argument("--prefix", default="gpt125m")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    results = {}
    for impl in args.implementations:
        run = Path(args.runs) / f"{args.prefix}_{impl}"
        if (run / "metrics.jsonl").exists():
            results[impl] = summarize(load(run))
    if not results:
        raise SystemExit(f"no runs {args.prefix}_<impl> with metrics under {args.runs}")
    steps = sorted(set.intersection(*(set(r["loss_by_step"]) for r in results.values())))
    shown = steps[:: max(len(steps) // 6, 1)] + ([steps[-1]] if steps else [])
    shown = sorted(set(shown))
    print("| implementation | " + " | ".join(f"loss@{s}" for s in shown)
          + " | final eval loss | tokens/s | MFU |")
    print("| --- |" + " --- |" * (len(shown) + 3))
    for impl, r in results.items():
        losses = " | ".join(f"{r['loss_by_step'][s]:.3f}" for s in shown)
        ev = "-" if r["final_eval_loss"] is None else f"{r['final_eval_loss']:.3f}"
        print(f"| {impl} | {losses} | {ev} | {r['tokens_per_second']:,.0f} | {100 * r['mfu']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
