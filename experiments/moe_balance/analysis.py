"""The tables of results.md beyond `jaxkit sweep`'s report: the max/mean
expert load of each variant at every logged step and per layer at the end.

    jaxkit sweep experiments/moe_balance/sweep.yaml
    python -m experiments.moe_balance.analysis [--out experiments/moe_balance]

Max/mean load = (largest fraction of the token-expert assignments any expert
receives) x (number of experts), as the trainer logs it per MoE layer
(train records, moe/<layer>/max_mean_load).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from jaxkit.sweep.plan import load_sweep
from jaxkit.sweep.report import read_metrics, read_record

SWEEP = Path(__file__).with_name("sweep.yaml")


def load_ratios(run_dir: Path) -> dict:
    """Per logged train step: max/mean load of each MoE layer; and the eval losses."""
    records = read_metrics(run_dir)
    ratios = {step: {k.split("/")[1]: v for k, v in r.items()
                     if k.startswith("moe/") and k.endswith("/max_mean_load")}
              for step, r in records.get("train", {}).items()}
    evals = {step: r["ce"] for step, r in records.get("eval", {}).items()}
    return {"ratios": ratios, "eval_ce": evals}


def write_markdown(results: dict, out: Path) -> None:
    mean = statistics.fmean
    names = list(results)
    steps = sorted(set.intersection(*(set(r["ratios"]) for r in results.values())))
    lines = [
        "# MoE load balance: aux-loss-free bias vs. none vs. aux loss",
        "",
        "`jaxkit sweep experiments/moe_balance/sweep.yaml`, then "
        "`python -m experiments.moe_balance.analysis` (configs/moe_small.yaml: 8 experts, top-2, "
        "MoE in layers 1 and 3; batch 16 x 128 tokens; CPU).",
        "Max/mean load = (largest fraction of the token-expert assignments any expert",
        "receives) x (number of experts): 1.0 is perfect balance, 4.0 means one expert",
        "gets half of them. Mean over the MoE layers, measured on each logged step's batch.",
        "",
        "Mean of the first and of the last five logged steps:",
        "",
        "| variant | start | end |",
        "| --- | ---: | ---: |",
        *(f"| {n} | {mean(mean(results[n]['ratios'][s].values()) for s in steps[:5]):.2f} | "
          f"{mean(mean(results[n]['ratios'][s].values()) for s in steps[-5:]):.2f} |" for n in names),
        "",
        "| step | " + " | ".join(names) + " |",
        "| ---: |" + " ---: |" * len(names),
    ]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{mean(results[n]['ratios'][s].values()):.2f}"
                                              for n in names) + " |")
    last = steps[-1]
    layers = results[names[0]]["ratios"][last]
    lines += ["", f"Per layer at step {last}:", "",
              "| variant | " + " | ".join(f"layer {l}" for l in layers) + " | final eval loss |",
              "| --- |" + " ---: |" * (len(layers) + 1)]
    for n in names:
        ev = results[n]["eval_ce"]
        final = f"{ev[max(ev)]:.3f}" if ev else "-"
        lines.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in results[n]["ratios"][last].values())
                     + f" | {final} |")
    lines += ["", "Wall time per run (s, on a shared machine): "
              + ", ".join(f"{n} {results[n]['seconds']:.0f}" for n in names), ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(SWEEP.parent), help="results.md/json go here")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = {}
    for run in load_sweep(SWEEP).runs:
        record = read_record(run.run_dir) or {}
        results[run.label] = load_ratios(run.run_dir) | {"seconds": record.get("seconds", 0.0)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
