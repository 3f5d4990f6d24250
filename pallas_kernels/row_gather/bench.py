"""Row-gather throughput: XLA's gather against the Pallas kernel, one run,
same device, at the row moves of MoE dispatch.

    python -m pallas_kernels.row_gather.bench [--json PATH]
        [--shapes 49152x4x1024] [--implementations xla,pallas]

A shape TxKxD is T tokens with k experts each and rows of D bf16 values
(configs/moe_1b.yaml: 48 x 1024 tokens, top-4, d_model 1024). Three ops,
as the dispatch runs them: 'gather' (tokens into expert order: [T*k, D]
from [T, D]), 'sum' (the gather's gradient: each token's k rows summed,
[T, D] from [T*k, D]) and 'combine' (the same with float32 router weights
and a float32 output). Indices are a random permutation's, as a router's
sort gives. Each op's ms and GB/s of the bytes it must move
(reference.row_gather_bytes), beside the bandwidth of a copy measured in
the same run (bytes read + written), and the kernel's error against the
reference. A failing implementation is reported in the table instead of
stopping the run. On a CPU, pass tiny shapes: 'pallas' then runs
interpreted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import (copy_gb_per_s, rel_err, shapes_main, short_error,
                                         time_fn)
from pallas_kernels.row_gather.api import row_gather
from pallas_kernels.row_gather.reference import row_gather_bytes

DTYPE = jnp.bfloat16


def _inputs(tokens, k, dim):
    """(op -> (src, index, weight, out_dtype)) of a dispatch's three moves."""
    keys = jax.random.split(jax.random.key(tokens * k + dim), 4)
    order = jax.random.permutation(keys[0], tokens * k).astype(jnp.int32)  # sorted row -> pair
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(tokens * k, dtype=jnp.int32))
    x = jax.random.normal(keys[1], (tokens, dim)).astype(DTYPE)
    rows = jax.random.normal(keys[2], (tokens * k, dim)).astype(DTYPE)
    weight = jax.nn.softmax(jax.random.normal(keys[3], (tokens, k)), axis=-1)
    slot = inverse.reshape(tokens, k)
    return {"gather": (x, order // k, None, DTYPE),
            "sum": (rows, slot, None, DTYPE),
            "combine": (rows, slot, weight, jnp.float32)}


def bench_shape(tokens, k, dim, implementations, iters) -> dict:
    """{"copy_gb_per_s": ..., op: {implementation: {ms, gb_per_s, rel_err} or {error}}}."""
    results = {"copy_gb_per_s": copy_gb_per_s((tokens * k, dim), DTYPE, iters)}
    for op, (src, index, weight, out_dtype) in _inputs(tokens, k, dim).items():
        want = row_gather(src, index, weight, out_dtype=out_dtype, implementation="xla")
        moved = row_gather_bytes(index.shape[0], 1 if index.ndim == 1 else index.shape[1], dim,
                                 src.dtype.itemsize, jnp.dtype(out_dtype).itemsize,
                                 weight is not None)
        for implementation in implementations:
            r = results.setdefault(op, {})[implementation] = {}
            fn = jax.jit(lambda s, i, w, impl=implementation, dt=out_dtype: row_gather(
                s, i, w, out_dtype=dt, implementation=impl))
            try:
                r["rel_err"] = rel_err(fn(src, index, weight), want)
                seconds = time_fn(fn, src, index, weight, iters=iters)
            except Exception as e:  # noqa: BLE001 - reported in the table
                r["error"] = short_error(e)
                continue
            r["ms"] = seconds * 1e3
            r["gb_per_s"] = moved / seconds / 1e9
    return results


def format_table(all_results: dict) -> str:
    lines = [f"{'shape':>14s} {'op':8s} {'impl':7s} {'ms':>8s} {'GB/s':>7s} {'% copy':>7s} "
             f"{'rel_err':>8s}  note"]
    for shape, results in all_results.items():
        copy = results["copy_gb_per_s"]
        lines.append(f"{shape:>14s} copy {copy:.0f} GB/s")
        for op, by_impl in results.items():
            for impl, r in by_impl.items() if op != "copy_gb_per_s" else ():
                if "error" in r:
                    lines.append(f"{shape:>14s} {op:8s} {impl:7s} {'-':>8s} {'-':>7s} {'-':>7s} "
                                 f"{'-':>8s}  {r['error']}")
                    continue
                lines.append(f"{shape:>14s} {op:8s} {impl:7s} {r['ms']:8.3f} {r['gb_per_s']:7.0f} "
                             f"{100 * r['gb_per_s'] / copy:7.0f} {r['rel_err']:8.1e}")
    return "\n".join(lines)


def main(argv=None):
    return shapes_main(__doc__, argv, default_shapes=["49152x4x1024"], dims_help="TxKxD",
                       bench_shape=bench_shape, format_table=format_table, dtype=DTYPE)


if __name__ == "__main__":
    main()
