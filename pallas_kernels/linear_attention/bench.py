"""Linear vs softmax attention throughput: tokens/s forward and
forward+backward of gated linear attention against causal flash attention,
one run, same device.

    python -m pallas_kernels.linear_attention.bench [--json PATH]
        [--lengths 8192,16384,32768,65536] [--batch 1] [--heads 16] [--dim 128]
        [--linear pallas] [--flash pallas] [--chunk 64]

Defaults: B1 H16 D128 bfloat16 at 8k-64k tokens, both as implementation
'pallas' (the chunked BlockSpec kernel with a per-head decay; flash
attention's Mosaic GPU kernel on Hopper). A failing implementation is
reported in the table instead of stopping the run. On a CPU, name 'xla'
for both and small sizes (the Pallas kernels compile for GPUs only).
"""
from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp

from pallas_kernels.attention import flash_attention
from pallas_kernels.benchmarking import measure_each, short_error, time_fn
from pallas_kernels.linear_attention.api import linear_attention


def _inputs(B, S, H, D, dtype):
    keys = jax.random.split(jax.random.key(S), 4)
    q, k, v = (jax.random.normal(key, (B, S, H, D), jnp.float32).astype(dtype) for key in keys[:3])
    log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, S, H)) + 4.0) / 16
    return q, k, v, log_decay


def kernels(linear: str, flash: str, chunk: int) -> dict:
    """name -> f(q, k, v, log_decay) -> out."""
    return {
        "linear": lambda q, k, v, g: linear_attention(q, k, v, g, chunk_size=chunk,
                                                      implementation=linear)[0],
        "flash": lambda q, k, v, g: flash_attention(q, k, v, causal=True, implementation=flash),
    }


def bench_length(S, *, B, H, D, linear, flash, chunk, iters) -> dict:
    """{kernel: {fwd_ms, fwdbwd_ms, fwd_tokens_per_s, fwdbwd_tokens_per_s} or {error}}."""
    args = _inputs(B, S, H, D, jnp.bfloat16)
    results = {}
    for name, f in kernels(linear, flash, chunk).items():
        loss = lambda q, k, v, g, f=f: f(q, k, v, g).astype(jnp.float32).sum()
        runs = {"fwd": jax.jit(f), "fwdbwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))}
        r = results[name] = {}
        for kind, fn in runs.items():
            try:
                seconds = time_fn(fn, *args, iters=iters)
            except Exception as e:  # noqa: BLE001 - reported in the table
                r[kind + "_error"] = short_error(e)
                continue
            r[kind + "_ms"] = seconds * 1e3
            r[kind + "_tokens_per_s"] = B * S / seconds
    return results


def format_table(all_results: dict) -> str:
    lines = [f"{'tokens':>7s} {'kernel':7s} {'fwd ms':>9s} {'fwd tok/s':>11s} {'f+b ms':>9s} "
             f"{'f+b tok/s':>11s}  note"]
    for S, results in all_results.items():
        for name, r in results.items():
            def cell(key, width, fmt):
                return format(r[key], fmt).rjust(width) if key in r else "-".rjust(width)
            note = "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("_error"))
            lines.append(f"{S:>7} {name:7s} {cell('fwd_ms', 9, '.2f')} "
                         f"{cell('fwd_tokens_per_s', 11, '.3g')} {cell('fwdbwd_ms', 9, '.2f')} "
                         f"{cell('fwdbwd_tokens_per_s', 11, '.3g')}  {note}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--lengths", type=_ints, default=[8192, 16384, 32768, 65536])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64, help="linear attention chunk size")
    parser.add_argument("--linear", default="pallas", help="linear_attention implementation")
    parser.add_argument("--flash", default="pallas", help="flash_attention implementation")
    parser.add_argument("--iters", type=int, default=10, help="timed samples per kernel")
    args = parser.parse_args(argv)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "dtype": "bfloat16", "batch": args.batch,
            "heads": args.heads, "dim": args.dim, "chunk": args.chunk, "linear": args.linear,
            "flash": args.flash}
    print(meta, flush=True)
    return measure_each(args.lengths, lambda S: bench_length(
        S, B=args.batch, H=args.heads, D=args.dim, linear=args.linear, flash=args.flash,
        chunk=args.chunk, iters=args.iters), format_table, meta, args.json)


if __name__ == "__main__":
    main()
