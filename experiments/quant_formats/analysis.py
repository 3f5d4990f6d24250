"""Quantisation formats on the runs of sweep.yaml: SNR and QAT loss.

    jaxkit sweep experiments/quant_formats/sweep.yaml
    python -m experiments.quant_formats.analysis

1. SNR (dB, signal power over quantisation-noise power, pooled over all
   Linear layers) of every format on the float run's weights (quantised
   along the contraction axis) and on its Linear inputs of a few eval
   batches, without and with a randomized Hadamard rotation of the
   contraction dimension.
2. The final eval loss of the QAT runs (weights and activations in one
   format, some also with Hadamard), each trained from scratch as long as
   the float run.
Writes results/README.md (tables), results/results.json and results/snr.png.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.data import TokenBatcher, TokenFile
from jaxkit.layers import Linear
from jaxkit.quant import dequantize, quantize, random_signs, rotate_activation, rotate_weight
from jaxkit.run.load import load_model
from jaxkit.sweep import plots
from jaxkit.sweep.plan import load_sweep, resolve
from jaxkit.sweep.report import read_metrics

SWEEP = Path(__file__).with_name("sweep.yaml")
RESULTS = Path(__file__).parent / "results"
SNR_FORMATS = ["int8", "fp8_e4m3", "mxint8", "mxfp8", "mxfp6_e2m3", "mxfp6_e3m2", "int4",
               "mxfp4", "nvint4", "nvfp4"]


class Recorder(nnx.Module):
    """Stands in for a Linear's quantizer to capture its inputs."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, x, kernel, compute_dtype):
        self.store.append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
        return jnp.dot(x.astype(compute_dtype), kernel.astype(compute_dtype))


def linear_layers(model):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def capture(model, val, batches: int = 2):
    layers = linear_layers(model)
    stores = [[] for _ in layers]
    for lin, store in zip(layers, stores):
        lin.quantizer = Recorder(store)
    for b in val.eval_batches(batches):
        model(jnp.asarray(b["inputs"]))
    for lin in layers:
        lin.quantizer = None
    weights = [np.asarray(lin.kernel[...], np.float32) for lin in layers]
    return weights, [np.concatenate(s) for s in stores]


def pooled_snr(pairs, fmt: str, axis: int, rotate: bool, key) -> float:
    signal = noise = 0.0
    for i, (a, n) in enumerate(pairs):
        a = jnp.asarray(a)
        if rotate:
            signs = random_signs(jax.random.fold_in(key, i), n)
            a = rotate_weight(a, signs) if axis == 0 else rotate_activation(a, signs)
        d = dequantize(quantize(a, fmt, axis=axis))
        signal += float(jnp.sum(jnp.square(a)))
        noise += float(jnp.sum(jnp.square(a - d)))
    return 10 * np.log10(signal / noise)


def snr_table(weights, acts, formats=SNR_FORMATS):
    key = jax.random.key(123)
    rows = {}
    w_pairs = [(w, w.shape[0]) for w in weights]
    a_pairs = [(a, a.shape[1]) for a in acts]
    for fmt in formats:
        rows[fmt] = {
            "weights": pooled_snr(w_pairs, fmt, 0, False, key),
            "weights_hadamard": pooled_snr(w_pairs, fmt, 0, True, key),
            "activations": pooled_snr(a_pairs, fmt, -1, False, key),
            "activations_hadamard": pooled_snr(a_pairs, fmt, -1, True, key),
        }
        print(fmt, {k: round(v, 2) for k, v in rows[fmt].items()}, flush=True)
    return rows


def verdict(snr, qat) -> str:
    s = lambda f, k: snr[f][k]
    parts = []
    for a, b in (("mxint8", "mxfp8"), ("nvint4", "nvfp4")):
        parts.append(
            f"{a} vs {b}: SNR weights {s(a, 'weights'):.2f} vs {s(b, 'weights'):.2f} dB "
            f"({s(a, 'weights_hadamard'):.2f} vs {s(b, 'weights_hadamard'):.2f} with Hadamard), "
            f"activations {s(a, 'activations'):.2f} vs {s(b, 'activations'):.2f} dB "
            f"({s(a, 'activations_hadamard'):.2f} vs {s(b, 'activations_hadamard'):.2f} with "
            f"Hadamard); QAT eval loss {qat[a]:.4f} vs {qat[b]:.4f} ({qat[a + '+hadamard']:.4f} "
            f"vs {qat[b + '+hadamard']:.4f} with Hadamard).")
    mx_ok = s("mxint8", "weights") > s("mxfp8", "weights") and \
        s("mxint8", "activations") > s("mxfp8", "activations")
    nv_rot_ok = s("nvint4", "weights_hadamard") > s("nvfp4", "weights_hadamard") and \
        s("nvint4", "activations_hadamard") > s("nvfp4", "activations_hadamard")
    summary = ("Agrees" if mx_ok and nv_rot_ok else "Partly agrees" if mx_ok or nv_rot_ok
               else "Does not agree") + \
        (" with the finding that MXINT8 beats MXFP8 and that NVINT4 can beat NVFP4 once a "
         "Hadamard rotation is applied (by SNR: MXINT8 > MXFP8 on weights and activations: "
         f"{mx_ok}; NVINT4 > NVFP4 on both after rotation: {nv_rot_ok}). "
         "A single small model trained briefly: treat as an indication, not a measurement.")
    return summary + "\n\n" + "\n\n".join(parts)


def write_markdown(res, out: Path):
    lines = ["# Quantisation formats on a small trained jaxkit model", "",
             f"Model: {res['model']}; the float run's final eval loss {res['eval_loss']:.3f} "
             "nats/byte. Produced by `jaxkit sweep experiments/quant_formats/sweep.yaml` and "
             "`python -m experiments.quant_formats.analysis`.", "",
             "## SNR (dB), pooled over all Linear layers", "",
             "Weights are quantised along the contraction (input) axis, activations (the "
             "Linear inputs of 2 eval batches) per token; scalar formats use per-channel / "
             "per-token absmax scales, MX and NV formats their own blocks. Hadamard: "
             "randomized Hadamard rotation of the contraction dimension first.", "",
             "| format | weights | weights + Hadamard | activations | activations + Hadamard |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for fmt, r in res["snr"].items():
        lines.append(f"| {fmt} | {r['weights']:.2f} | {r['weights_hadamard']:.2f} | "
                     f"{r['activations']:.2f} | {r['activations_hadamard']:.2f} |")
    lines += ["", "## QAT: final eval loss, weights and activations in the format from the "
              "first step", "", "| run | eval loss |", "| --- | ---: |"]
    lines += [f"| {name} | {loss:.4f} |" for name, loss in res["qat"].items()]
    lines += ["", "## Against the published INT-vs-FP finding", "", res["verdict"], ""]
    (out / "README.md").write_text("\n".join(lines))


def plot(snr, path: Path):
    plt = plots.pyplot()
    fmts = list(snr)
    keys = ["weights", "weights_hadamard", "activations", "activations_hadamard"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for i, k in enumerate(keys):
        ax.bar(np.arange(len(fmts)) + (i - 1.5) * width, [snr[f][k] for f in fmts], width,
               label=k.replace("_", " + "))
    ax.set_xticks(np.arange(len(fmts)), fmts, rotation=30)
    ax.set_ylabel("SNR (dB)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_eval_loss(run_dir: Path, steps: int) -> float | None:
    """The eval loss a run logged at its last step (None before it gets there)."""
    record = read_metrics(run_dir).get("eval", {}).get(steps)
    return None if record is None else record["ce"]


def analyse(sweep_path: Path = SWEEP, out: Path = RESULTS, formats=SNR_FORMATS) -> dict:
    sweep = load_sweep(sweep_path)
    configs = resolve(sweep)
    (run, cfg), = [(r, c) for r, c in zip(sweep.runs, configs) if r.label == "float"]
    model = load_model(cfg, run_dir=run.run_dir)
    d = cfg.data
    val = TokenBatcher(TokenFile(Path(d.path) / "val"), d.seq_len, d.batch_size, seed=d.seed)
    snr = snr_table(*capture(model, val), formats)
    qat = {r.label: final_eval_loss(r.run_dir, c.train.steps) for r, c in zip(sweep.runs, configs)
           if (r.run_dir / "metrics.jsonl").exists()}
    qat = {name: loss for name, loss in qat.items() if loss is not None}
    m = cfg.model
    res = {"model": f"d_model {m.d_model}, {m.num_layers} layers, mlp {m.mlp_hidden}, "
                    f"seq {d.seq_len}, batch {d.batch_size}, {cfg.train.steps} steps",
           "eval_loss": qat["float"], "snr": snr, "qat": qat}
    compared = {f + h for f in ("mxint8", "mxfp8", "nvint4", "nvfp4") for h in ("", "+hadamard")}
    res["verdict"] = verdict(snr, qat) if set(qat) >= compared else \
        f"(not all of the QAT runs {', '.join(sorted(compared))} have finished)"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out)
    plot(snr, out / "snr.png")
    return res


if __name__ == "__main__":
    print(analyse()["verdict"])
