"""Aux-loss-free balancing on configs/moe_small.yaml: how the max/mean expert
load ratio evolves over training.

Trains the config with jaxkit.run.trainer once per variant:
  sigmoid_bias       router sigmoid_bias, no auxiliary loss, bias update rate --rate
  sigmoid_no_update  the same with rate 0: the control, nothing balances
  softmax_aux        router topk_softmax with the usual aux loss (weight 0.01)
and writes <out>/results.md: the max/mean load ratio (1.0 = perfectly
balanced; mean over the MoE layers) at the logged steps, each layer's ratio
at the end and the final eval loss, plus <out>/results.json.

    python -m experiments.moe_balance.run --steps 200 --out experiments/moe_balance

DeepSeek-V3 uses rate 0.001 over many thousand steps; a run of a few hundred
steps needs a larger rate for the bias to move far enough.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxkit.config import load_config
from jaxkit.run.trainer import train

CONFIG = "configs/moe_small.yaml"


def variants(rate: float) -> dict[str, list[str]]:
    sigmoid = ["model.moe.router=sigmoid_bias", "model.moe.aux_loss_weight=0"]
    return {
        "sigmoid_bias": sigmoid + [f"model.moe.bias_update_rate={rate}"],
        "sigmoid_no_update": sigmoid + ["model.moe.bias_update_rate=0"],
        "softmax_aux": ["model.moe.router=topk_softmax", "model.moe.aux_loss_weight=0.01"],
    }


def load_ratios(run_dir: Path) -> dict:
    """Per logged train step: max/mean load of each MoE layer; and the eval losses."""
    ratios, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            ratios[r["step"]] = {k.split("/")[1]: v for k, v in r.items()
                                 if k.startswith("moe/") and k.endswith("/max_mean_load")}
        elif r["split"] == "eval":
            evals[r["step"]] = r["ce"]
    return {"ratios": ratios, "eval_ce": evals}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def write_markdown(results: dict, args, out: Path) -> None:
    names = list(results)
    steps = sorted(set.intersection(*(set(r["ratios"]) for r in results.values())))
    lines = [
        "# MoE load balance: aux-loss-free bias vs. none vs. aux loss",
        "",
        (f"`python -m experiments.moe_balance.run --steps {args.steps} --rate {args.rate}` "
         f"({CONFIG}: 8 experts, top-2, MoE in layers 1 and 3; batch 16 x 128 tokens; CPU)."),
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
    lines += ["", f"Per layer at step {last}:", "",
              "| variant | " + " | ".join(f"layer {l}" for l in results[names[0]]["ratios"][last])
              + " | final eval loss |",
              "| --- |" + " ---: |" * (len(results[names[0]]["ratios"][last]) + 1)]
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
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rate", type=float, default=0.01, help="bias update rate of sigmoid_bias")
    p.add_argument("--runs", default="runs/moe_balance", help="run directories go here")
    p.add_argument("--out", default="experiments/moe_balance", help="results.md/json go here")
    p.add_argument("--only", nargs="*", help="run only these variants")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, overrides in variants(args.rate).items():
        if args.only and name not in args.only:
            continue
        cfg = load_config(CONFIG, overrides + [f"train.steps={args.steps}", "train.progress=false",
                                               "train.log_every=5", "checkpoint.enabled=false"])
        run_dir = Path(args.runs) / name
        for f in ("metrics.jsonl",):  # a fresh record per run
            (run_dir / f).unlink(missing_ok=True)
        t0 = time.perf_counter()
        train(cfg, run_dir=run_dir)
        results[name] = load_ratios(run_dir) | {"seconds": time.perf_counter() - t0}
        print(f"{name}: done in {results[name]['seconds']:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
