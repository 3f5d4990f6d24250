"""Grouped-matmul benchmark: TFLOP/s of gmm forward+backward, one run, same GPU.

    python -m pallas_kernels.grouped_matmul.bench [--json PATH] [--tune]

Problem (an MoE expert layer): T=16384 tokens routed top_k=2, so M = T*top_k
= 32768 rows, K = d_model = 2048, N = expert hidden = 1408, G = 64 experts.
Group sizes are a multinomial draw of M rows over Dirichlet(alpha) expert
probabilities (alpha = 1 and 0.3; smaller is more imbalanced), plus equal
groups. FLOPs = 2*M*K*N per matmul; forward+backward (gmm, d-lhs gmm, d-rhs
tgmm) is 3x that.

Measured in the same run: 'pallas' (our Mosaic GPU kernels), 'ragged_dot'
(jax.lax.ragged_dot) and 'dense' (a batched einsum over equal groups
[G, M/G, K] x [G, K, N]: the same FLOPs with no raggedness, a ceiling).
Every implementation is first checked against the float32 reference on a
smaller ragged problem (empty groups, rows past the groups); a failure is
printed in the table and that implementation is not timed.
"""
from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarking import rel_err, time_fn, write_rows
from pallas_kernels.grouped_matmul import mosaic_gpu
from pallas_kernels.grouped_matmul.api import gmm
from pallas_kernels.grouped_matmul.reference import gmm_flops, gmm_reference

TOKENS, TOP_K, D_MODEL, D_EXPERT, EXPERTS = 16384, 2, 2048, 1408, 64
ROUTINGS = (("dirichlet1.0", 1.0), ("dirichlet0.3", 0.3), ("balanced", None))
TUNE_GMM = [(128, 64, 128), (64, 64, 256), (128, 128, 128), (64, 64, 128)]
TUNE_TGMM = [(128, 64, 128), (64, 128, 128), (128, 128, 128), (64, 64, 256)]
DTYPE = jnp.bfloat16


def group_sizes(m, g, alpha, seed=0):
    rng = np.random.default_rng(seed)
    if alpha is None:
        sizes = np.full(g, m // g)
        sizes[-1] += m - sizes.sum()
    else:
        sizes = rng.multinomial(m, rng.dirichlet(np.full(g, alpha)))
    return jnp.asarray(sizes, jnp.int32)


def fwd_bwd(implementation):
    def f(lhs, rhs, sizes, cot):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, implementation=implementation), lhs, rhs)
        return (out, *vjp(cot))
    return jax.jit(f)


@jax.jit
def dense_fwd_bwd(lhs, rhs, cot):
    g = rhs.shape[0]
    f = lambda a, b: jnp.einsum("gmk,gkn->gmn", a.reshape(g, -1, a.shape[1]), b).reshape(-1, b.shape[2])
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(cot))


def inputs(m, k, n, g, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (m, k), jnp.float32).astype(DTYPE),
            (jax.random.normal(ks[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(DTYPE),
            jax.random.normal(ks[2], (m, n), jnp.float32).astype(DTYPE))


def check(implementation):
    """Max relative error of out, d-lhs, d-rhs against the float32 reference on
    a ragged problem (empty groups, 100 rows past the groups)."""
    m, k, n, g = 4096, 512, 384, 8
    sizes = jnp.asarray([900, 0, 1200, 300, 0, 1, 1500, 95], jnp.int32)
    lhs, rhs, cot = inputs(m, k, n, g, seed=1)
    got = fwd_bwd(implementation)(lhs, rhs, sizes, cot)
    up = lambda x: x.astype(jnp.float32)
    ref_out, vjp = jax.vjp(lambda a, b: gmm_reference(a, b, sizes), up(lhs), up(rhs))
    want = (ref_out, *vjp(up(cot)))
    return max(rel_err(a, b) for a, b in zip(got, want))


def tune(lhs, rhs, cot, sizes, rows):
    """TFLOP/s of each Mosaic kernel alone under a few tilings."""
    m, k = lhs.shape
    n = rhs.shape[2]
    flops = gmm_flops(m, k, n)
    kernels = {
        "gmm": lambda t: jax.jit(lambda a, b, s: mosaic_gpu.gmm(a, b, s, out_dtype=DTYPE, tiling=t)),
        "gmm_dlhs": lambda t: jax.jit(lambda a, b, s: mosaic_gpu.gmm(a, b, s, transpose_rhs=True,
                                                                      out_dtype=DTYPE, tiling=t)),
        "tgmm": lambda t: jax.jit(lambda a, b, s: mosaic_gpu.tgmm(a, b, s, out_dtype=DTYPE, tiling=t)),
    }
    args = {"gmm": (lhs, rhs, sizes), "gmm_dlhs": (cot, rhs, sizes), "tgmm": (lhs, cot, sizes)}
    for name, make in kernels.items():
        for tiling in (TUNE_TGMM if name == "tgmm" else TUNE_GMM):
            row = dict(kind="tune", kernel=name, tiling=tiling)
            try:
                row["tflops"] = flops / time_fn(make(tiling), *args[name], iters=8) / 1e12
            except Exception as e:  # a tiling may not fit shared memory
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            print(row, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--tune", action="store_true", help="also time each kernel per tiling")
    args = parser.parse_args()
    m, k, n, g = TOKENS * TOP_K, D_MODEL, D_EXPERT, EXPERTS
    flops = 3 * gmm_flops(m, k, n)
    rows, ok = [], {}
    for impl in ("pallas", "ragged_dot"):
        try:
            err = check(impl)
            ok[impl] = err < 2e-2
            rows.append(dict(kind="check", impl=impl, rel_err=err, ok=ok[impl]))
        except Exception:
            ok[impl] = False
            rows.append(dict(kind="check", impl=impl, error=traceback.format_exc()[-400:]))
        print(rows[-1], flush=True)

    lhs, rhs, cot = inputs(m, k, n, g, seed=0)
    dense_s = time_fn(dense_fwd_bwd, lhs, rhs, cot)
    for name, alpha in ROUTINGS:
        sizes = group_sizes(m, g, alpha)
        if name == "dirichlet1.0" and args.tune and ok["pallas"]:
            tune(lhs, rhs, cot, sizes, rows)
        outs = {}
        for impl in ("pallas", "ragged_dot"):
            row = dict(kind="fwd_bwd", routing=name, impl=impl, sizes=dict(
                max=int(sizes.max()), min=int(sizes.min()), empty=int((sizes == 0).sum())))
            if ok[impl]:
                f = fwd_bwd(impl)
                outs[impl] = f(lhs, rhs, sizes, cot)
                row["ms"] = time_fn(f, lhs, rhs, sizes, cot) * 1e3
                row["tflops"] = flops / row["ms"] / 1e9
            rows.append(row)
        if len(outs) == 2:   # the two implementations agree at full size
            rows[-2]["rel_err_vs_ragged_dot"] = max(
                rel_err(a, b) for a, b in zip(outs["pallas"], outs["ragged_dot"]))
        rows.append(dict(kind="fwd_bwd", routing=name, impl="dense (equal groups)",
                         ms=dense_s * 1e3, tflops=flops / dense_s / 1e12))
        for r in rows[-3:]:
            print(r, flush=True)

    device = jax.devices()[0]
    header = (f"{device.device_kind}, jax {jax.__version__}, bf16, M={m} (T={TOKENS} x top_k={TOP_K}),"
              f" K={k}, N={n}, G={g}; TFLOP/s = 3*2*M*K*N / time of gmm fwd + d-lhs + d-rhs")
    print("\n" + header)
    print(f"{'routing':14s} {'implementation':22s} {'ms':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        if r["kind"] == "fwd_bwd":
            ms = f"{r['ms']:8.3f}" if "ms" in r else "  failed"
            tf = f"{r['tflops']:8.1f}" if "tflops" in r else ""
            print(f"{r['routing']:14s} {r['impl']:22s} {ms} {tf}")
    if args.json:
        write_rows(args.json, header, rows)


if __name__ == "__main__":
    main()
