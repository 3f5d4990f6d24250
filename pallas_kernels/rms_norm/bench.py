"""RMSNorm and fused residual-add + RMSNorm throughput: XLA's fusions
against the Pallas kernel, one run, same device.

    python -m pallas_kernels.rms_norm.bench [--json PATH]
        [--shapes 32768x1024,16384x2048] [--implementations xla,pallas]

Defaults: the norm inputs of configs/moe_1b.yaml ([32768, 1024]) and
configs/dense_1b.yaml ([16384, 2048]) in bfloat16 with a float32 scale.
For each op and implementation: the forward alone, and forward + backward
as a training step runs them (y from the forward, the input and scale
gradients from given cotangents), in ms and in GB/s of the bytes a fused
implementation must move (reference.rms_norm_bytes), beside the bandwidth
of a copy of one [rows, D] array measured in the same run (bytes read +
written). Each kernel's outputs are checked against the reference's
(rel_err). A failing implementation is reported in the table instead of
stopping the run. On a CPU, pass tiny shapes: 'pallas' then runs
interpreted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import (copy_gb_per_s, rel_err, shapes_main, short_error,
                                         time_fn)
from pallas_kernels.rms_norm.api import add_rms_norm, rms_norm
from pallas_kernels.rms_norm.reference import rms_norm_bytes

EPS = 1e-6
DTYPE = jnp.bfloat16


def _inputs(rows, dim):
    keys = jax.random.split(jax.random.key(rows * dim), 5)
    x, delta, dsum, dy = (jax.random.normal(k, (rows, dim), jnp.float32).astype(DTYPE)
                          for k in keys[:4])
    scale = 1.0 + 0.1 * jax.random.normal(keys[4], (dim,))
    return x, delta, scale, dsum, dy


def ops(implementation: str) -> dict:
    """op -> (forward(x, delta, scale), forward_backward(x, delta, scale,
    dsum, dy)), both returning every output, jitted."""
    kw = dict(eps=EPS, implementation=implementation)

    def norm_fwdbwd(x, delta, scale, dsum, dy):
        y, pull = jax.vjp(lambda x, s: rms_norm(x, s, **kw), x, scale)
        return y, pull(dy)

    def add_fwdbwd(x, delta, scale, dsum, dy):
        out, pull = jax.vjp(lambda x, d, s: add_rms_norm(x, d, s, **kw), x, delta, scale)
        return out, pull((dsum, dy))

    return {"rms_norm": (jax.jit(lambda x, delta, scale: rms_norm(x, scale, **kw)),
                         jax.jit(norm_fwdbwd)),
            "add_rms_norm": (jax.jit(lambda x, delta, scale: add_rms_norm(x, delta, scale, **kw)),
                             jax.jit(add_fwdbwd))}


def bench_shape(rows, dim, implementations, iters) -> dict:
    """{"copy_gb_per_s": ..., op: {implementation: {fwd_ms, fwd_gb_per_s,
    fwdbwd_ms, fwdbwd_gb_per_s, rel_err} or {..._error}}}."""
    args = _inputs(rows, dim)
    results = {"copy_gb_per_s": copy_gb_per_s((rows, dim), DTYPE, iters)}
    want = {op: fns[0](*args[:3]) for op, fns in ops("xla").items()}
    itemsize = jnp.dtype(DTYPE).itemsize
    for implementation in implementations:
        for op, (forward, forward_backward) in ops(implementation).items():
            r = results.setdefault(op, {})[implementation] = {}
            add = op == "add_rms_norm"
            try:
                got = forward(*args[:3])
                r["rel_err"] = max(rel_err(g, w) for g, w in
                                   zip(jax.tree.leaves(got), jax.tree.leaves(want[op])))
            except Exception as e:  # noqa: BLE001 - reported in the table
                r["fwd_error"] = short_error(e)
                continue
            for kind, fn, n in (("fwd", forward, 3), ("fwdbwd", forward_backward, 5)):
                try:
                    seconds = time_fn(fn, *args[:n], iters=iters)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    r[kind + "_error"] = short_error(e)
                    continue
                moved = rms_norm_bytes(rows, dim, itemsize, add=add,
                                       with_backward=kind == "fwdbwd")
                r[kind + "_ms"] = seconds * 1e3
                r[kind + "_gb_per_s"] = moved / seconds / 1e9
    return results


# (header, result key, format) of the table's timed columns
COLUMNS = (("fwd ms", "fwd_ms", ".3f"), ("GB/s", "fwd_gb_per_s", ".0f"),
           ("f+b ms", "fwdbwd_ms", ".3f"), ("GB/s", "fwdbwd_gb_per_s", ".0f"),
           ("rel_err", "rel_err", ".1e"))


def format_table(all_results: dict) -> str:
    lines = [f"{'shape':>12s} {'op':13s} {'impl':7s} "
             + " ".join(h.rjust(8) for h, _, _ in COLUMNS) + "  note"]
    for shape, results in all_results.items():
        lines.append(f"{shape:>12s} copy {results['copy_gb_per_s']:.0f} GB/s")
        for op, by_impl in results.items():
            for impl, r in by_impl.items() if op != "copy_gb_per_s" else ():
                cells = (format(r[key], fmt) if key in r else "-" for _, key, fmt in COLUMNS)
                errors = "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("_error"))
                lines.append(f"{shape:>12s} {op:13s} {impl:7s} "
                             + " ".join(c.rjust(8) for c in cells) + f"  {errors}")
    return "\n".join(lines)


def main(argv=None):
    return shapes_main(__doc__, argv, default_shapes=["32768x1024", "16384x2048"],
                       dims_help="ROWSxD", bench_shape=bench_shape, format_table=format_table,
                       dtype=DTYPE)


if __name__ == "__main__":
    main()
