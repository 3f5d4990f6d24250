"""Quantised grouped-matmul benchmark (forward, MoE expert shapes), one run, same GPU.

    python -m pallas_kernels.quant_grouped_matmul.bench [--json PATH] [--shapes decode prefill]

Shapes (E experts, K = d_model, N = expert hidden, Mixtral-8x7B's w1):
  decode   E=8, M=64 routed rows (8 per expert),          K=4096, N=14336
  prefill  E=8, M=8192 routed rows (4096 tokens x top-2), K=4096, N=14336
Group sizes are a multinomial draw over Dirichlet(1) expert probabilities
(seeded) for prefill and equal groups for decode. lhs is bf16, every output
bf16.

Measured in the same process: qgmm (the portable Pallas kernel, Triton
lowering) on int8 per-channel, int4 (group 128) and fp8 e4m3 (group 128)
weights; 'XLA dequantise + gmm' (the weights dequantised to bf16 by XLA, then
grouped_matmul.gmm 'auto': the Mosaic GPU kernel on Hopper), the path MoE
mode 'int' took before this kernel; and the bf16 grouped matmul on bf16
weights (grouped_matmul.gmm 'pallas' = Mosaic GPU on Hopper, and
jax.lax.ragged_dot). Every variant's output is checked against the float32
reference on a sample of rows (the first rows of every group, and rows past
the groups, which must be zero: the full masked reference costs G*M*K*N
float32 products, minutes at the prefill shape) before it is timed; a failed
check or a crash is reported in the table and the variant is not timed.
"""
from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarking import rel_err, time_fn, write_rows
from pallas_kernels.grouped_matmul import gmm
from pallas_kernels.quant_grouped_matmul.api import default_tiling, qgmm
from pallas_kernels.quant_grouped_matmul.reference import dequantize_groups, pack_int4_groups

SHAPES = {"decode": (64, 4096, 14336, 8), "prefill": (8192, 4096, 14336, 8)}
# Swept (tm, tk, tn) per shape; api.TUNED_TILINGS holds the fastest of each kind
# (the table marks the API's default).
TILINGS = {"prefill": [(128, 64, 128), (128, 128, 64), (128, 128, 128), (64, 128, 128),
                       (64, 64, 256)],
           "decode": [(16, 128, 64), (16, 128, 128), (16, 64, 64), (16, 64, 128), (64, 64, 128)]}
GROUP = 128  # int4 and fp8 scale group along K
TOLERANCE = 2e-2  # relative error of a bf16-output matmul against the f32 reference
BF16 = jnp.bfloat16


def group_sizes(m, g, routing, seed=0):
    if routing == "decode":
        return jnp.full((g,), m // g, jnp.int32)
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.multinomial(m, rng.dirichlet(np.ones(g))), jnp.int32)


def sampled_reference(lhs, w, sizes, per_group=8):
    """(row indices, float32 reference rows): the first per_group rows of each
    group times its weights w [G, K, N], and up to per_group rows past the
    groups (zeros)."""
    sizes = np.asarray(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    idx, want = [], []
    x = lhs.astype(jnp.float32)
    for g, size in enumerate(sizes):
        rows = np.arange(starts[g], starts[g] + min(per_group, size))
        if rows.size:
            idx.append(rows)
            want.append(jnp.dot(x[rows], w[g], precision=jax.lax.Precision.HIGHEST))
    tail = np.arange(starts[-1], min(starts[-1] + per_group, lhs.shape[0]))
    if tail.size:
        idx.append(tail)
        want.append(jnp.zeros((tail.size, w.shape[2]), jnp.float32))
    return np.concatenate(idx), jnp.concatenate(want)


def quantised(w, kind):
    """(codes, scales, group_size) of float32 weights [G, K, N], symmetric absmax."""
    g, k, n = w.shape
    gs = k if kind == "int8" else GROUP
    blocks = w.reshape(g, k // gs, gs, n)
    top = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[kind]
    scales = jnp.max(jnp.abs(blocks), axis=2) / top
    q = blocks / scales[:, :, None, :]
    if kind == "fp8":
        return q.reshape(g, k, n).astype(jnp.float8_e4m3fn), scales, gs
    q = jnp.round(q).astype(jnp.int8).reshape(g, k, n)
    return (pack_int4_groups(q) if kind == "int4" else q), scales, gs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        m, k, n, g = SHAPES[shape]
        print(f"{shape}: preparing weights and references", flush=True)
        ks = jax.random.split(jax.random.key(0), 2)
        lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(BF16)
        w = jax.random.normal(ks[1], (g, k, n), jnp.float32) / np.sqrt(k)
        sizes = group_sizes(m, g, shape)
        flops = 2.0 * m * k * n
        io = m * k * 2 + m * n * 2  # bf16 lhs and output bytes
        variants = []  # (implementation, kind, config, fn, args, weight bytes, reference out)
        for kind in ("int8", "int4", "fp8"):
            codes, scales, gs = quantised(w, kind)
            wbytes = codes.size * codes.dtype.itemsize + scales.size * 4
            ref = sampled_reference(lhs, dequantize_groups(codes, scales, kind=kind, group_size=gs),
                                    sizes)
            for tiling in TILINGS[shape]:
                fn = jax.jit(lambda x, c, s, sz, kind=kind, gs=gs, tiling=tiling: qgmm(
                    x, c, s, sz, kind=kind, group_size=gs, implementation="pallas",
                    preferred_element_type=BF16, tiling=tiling))
                default = " (default)" if tiling == default_tiling(kind, m, g) else ""
                variants.append(("qgmm (Pallas, Triton)", kind, f"tiling {tiling}{default}", fn,
                                 (lhs, codes, scales, sizes), wbytes, ref))
            if kind != "fp8":
                fn = jax.jit(lambda x, c, s, sz, kind=kind, gs=gs: gmm(
                    x, dequantize_groups(c, s, kind=kind, group_size=gs).astype(BF16), sz,
                    implementation="auto"))
                variants.append(("XLA dequantise + gmm", kind, "", fn,
                                 (lhs, codes, scales, sizes), wbytes, ref))
        wb = w.astype(BF16)
        bf16_ref = sampled_reference(lhs, wb.astype(jnp.float32), sizes)
        for impl in ("pallas", "ragged_dot"):
            fn = jax.jit(lambda x, w_, sz, impl=impl: gmm(x, w_, sz, implementation=impl))
            variants.append((f"bf16 gmm ({impl})", "bf16", "", fn, (lhs, wb, sizes),
                             wb.size * 2, bf16_ref))
        for impl, kind, config, fn, fargs, wbytes, ref in variants:
            row = dict(shape=shape, m=m, k=k, n=n, g=g, impl=impl, kind=kind, config=config)
            print(f"{shape}: checking {impl} {kind} {config}", flush=True)  # locates a hang
            try:
                rows_checked, want = ref
                row["rel_err"] = rel_err(fn(*fargs)[rows_checked], want)
                row["ok"] = bool(row["rel_err"] < TOLERANCE)
                if row["ok"]:
                    sec = time_fn(fn, *fargs)
                    row.update(ms=sec * 1e3, tflops=flops / sec / 1e12,
                               gbs=(wbytes + io) / sec / 1e9)
            except Exception:
                row["error"] = traceback.format_exc()[-600:]
            rows.append(row)
            print(row, flush=True)

    device = jax.devices()[0]
    header = (f"{device.device_kind}, jax {jax.__version__}, forward, bf16 lhs and output; "
              + "; ".join(f"{s}: M={m} K={k} N={n} E={g}" for s, (m, k, n, g) in SHAPES.items()
                          if s in args.shapes))
    print("\n" + header)
    print(f"{'shape':8s} {'implementation':24s} {'weights':7s} {'config':34s} {'ms':>8s} "
          f"{'TFLOP/s':>8s} {'GB/s':>7s} {'rel_err':>8s}")
    for r in rows:
        ms = f"{r['ms']:8.3f}" if "ms" in r else ("   error" if "error" in r else "  failed")
        tf = f"{r['tflops']:8.1f} {r['gbs']:7.0f}" if "ms" in r else f"{'':8s} {'':7s}"
        err = f"{r['rel_err']:8.1e}" if "rel_err" in r else ""
        print(f"{r['shape']:8s} {r['impl']:24s} {r['kind']:7s} {r['config']:34s} {ms} {tf} {err}")
    if args.json:
        write_rows(args.json, header, rows)


if __name__ == "__main__":
    main()
