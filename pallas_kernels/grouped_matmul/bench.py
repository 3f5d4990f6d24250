"""Grouped-matmul benchmark: TFLOP/s of gmm forward+backward, one run, same GPU.

    python -m pallas_kernels.grouped_matmul.bench [--json PATH] [--tune]
    python -m pallas_kernels.grouped_matmul.bench --consumers [--write-table] [--json PATH]

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

--consumers: at configs/moe_1b.yaml's expert shapes (48 x 1024 tokens top-4,
so M = 196608 rows, G = 32, Dirichlet(4) group sizes; gate and up in one
matmul K=1024, N=1280, and the down projection K=640, N=1024) each Mosaic
kernel (gmm, gmm for d-lhs, tgmm for d-rhs) at its one-consumer default, the
two-consumer kernels (two_consumers.py) at TUNE_TWO_CONSUMERS and the gmms
with the consumers in ping-pong at TUNE_PINGPONG; gmm forward+backward
through the API with consumers=1, 2 and 2 in ping-pong; and the dense
batched einsum of the same FLOPs (forward, and forward+backward). The
two-consumer kernels are checked first like the implementations above.
--write-table also records the fastest two-consumer tiling of each kernel,
schedule and shape in tuning_table.json for this device (tuning.py), which
the API then uses where no tiling is given.
"""
from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarking import rel_err, time_fn, write_rows
from pallas_kernels.grouped_matmul import mosaic_gpu, tuning, two_consumers
from pallas_kernels.grouped_matmul.api import gmm
from pallas_kernels.grouped_matmul.reference import gmm_flops, gmm_reference

TOKENS, TOP_K, D_MODEL, D_EXPERT, EXPERTS = 16384, 2, 2048, 1408, 64
ROUTINGS = (("dirichlet1.0", 1.0), ("dirichlet0.3", 0.3), ("balanced", None))
TUNE_GMM = [(128, 64, 128), (64, 64, 256), (128, 128, 128), (64, 64, 128)]
TUNE_TGMM = [(128, 64, 128), (64, 128, 128), (128, 128, 128), (64, 64, 256)]
MOE_1B = dict(m=49152 * 4, g=32, alpha=4.0, shapes=(("gate_up", 1024, 1280), ("down", 640, 1024)))
TUNE_TWO_CONSUMERS = {"gmm": [(128, 64, 256), (256, 64, 128), (128, 128, 128)],
                      "tgmm": [(64, 128, 256), (64, 256, 128), (128, 128, 128)]}
TUNE_PINGPONG = [(128, 64, 128), (64, 64, 256), (128, 128, 128)]  # a consumer's item
KERNELS = ("gmm", "gmm_dlhs", "tgmm")
DTYPE = jnp.bfloat16


def group_sizes(m, g, alpha, seed=0):
    rng = np.random.default_rng(seed)
    if alpha is None:
        sizes = np.full(g, m // g)
        sizes[-1] += m - sizes.sum()
    else:
        sizes = rng.multinomial(m, rng.dirichlet(np.full(g, alpha)))
    return jnp.asarray(sizes, jnp.int32)


def fwd_bwd(implementation, consumers=1, pingpong=False):
    def f(lhs, rhs, sizes, cot):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, implementation=implementation,
                                            consumers=consumers, pingpong=pingpong), lhs, rhs)
        return (out, *vjp(cot))
    return jax.jit(f)


def dense(lhs, rhs):
    """The batched einsum over equal groups: [G, M/G, K] x [G, K, N] -> [M, N]."""
    g = rhs.shape[0]
    out = jnp.einsum("gmk,gkn->gmn", lhs.reshape(g, -1, lhs.shape[1]), rhs)
    return out.reshape(-1, rhs.shape[2])


@jax.jit
def dense_fwd_bwd(lhs, rhs, cot):
    out, vjp = jax.vjp(dense, lhs, rhs)
    return (out, *vjp(cot))


def kernel_fn(name, kernels, tiling, pingpong=False):
    """One Mosaic kernel (``KERNELS``) of ``kernels`` (mosaic_gpu or
    two_consumers, whose gmm takes ``pingpong``), jitted; its operands are
    ``kernel_args``."""
    if name == "tgmm":
        return jax.jit(lambda a, b, s: kernels.tgmm(a, b, s, out_dtype=DTYPE, tiling=tiling))
    extra = dict(pingpong=True) if pingpong else {}
    return jax.jit(lambda a, b, s: kernels.gmm(a, b, s, transpose_rhs=name == "gmm_dlhs",
                                               out_dtype=DTYPE, tiling=tiling, **extra))


def kernel_args(name, lhs, rhs, cot, sizes):
    return {"gmm": (lhs, rhs, sizes), "gmm_dlhs": (cot, rhs, sizes),
            "tgmm": (lhs, cot, sizes)}[name]


def inputs(m, k, n, g, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (m, k), jnp.float32).astype(DTYPE),
            (jax.random.normal(ks[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(DTYPE),
            jax.random.normal(ks[2], (m, n), jnp.float32).astype(DTYPE))


def check(implementation, consumers=1, pingpong=False):
    """Max relative error of out, d-lhs, d-rhs against the float32 reference on
    a ragged problem (empty groups, 100 rows past the groups)."""
    m, k, n, g = 4096, 512, 384, 8
    sizes = jnp.asarray([900, 0, 1200, 300, 0, 1, 1500, 95], jnp.int32)
    lhs, rhs, cot = inputs(m, k, n, g, seed=1)
    got = fwd_bwd(implementation, consumers, pingpong)(lhs, rhs, sizes, cot)
    up = lambda x: x.astype(jnp.float32)
    ref_out, vjp = jax.vjp(lambda a, b: gmm_reference(a, b, sizes), up(lhs), up(rhs))
    want = (ref_out, *vjp(up(cot)))
    return max(rel_err(a, b) for a, b in zip(got, want))


def timed(row, flops, f, *args):
    """row with the median ms and TFLOP/s of f(*args), or the error it raised
    (a tiling may not fit shared memory)."""
    try:
        row["ms"] = time_fn(f, *args, iters=8) * 1e3
        row["tflops"] = flops / row["ms"] / 1e9
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    print(row, flush=True)
    return row


def tune(lhs, rhs, cot, sizes, rows):
    """TFLOP/s of each Mosaic kernel alone under a few tilings."""
    m, k = lhs.shape
    flops = gmm_flops(m, k, rhs.shape[2])
    for name in KERNELS:
        for tiling in (TUNE_TGMM if name == "tgmm" else TUNE_GMM):
            rows.append(timed(dict(kind="tune", kernel=name, tiling=tiling), flops,
                              kernel_fn(name, mosaic_gpu, tiling),
                              *kernel_args(name, lhs, rhs, cot, sizes)))


def fastest_tilings(rows):
    """{tuning table key: tiling} of the fastest two-consumer row of each
    kernel, schedule and shape among the timed ``rows``."""
    schedules = {"2 consumers": "split", "2 in ping-pong": "pingpong"}
    best = {}
    for r in rows:
        if r.get("kind") != "consumers" or r.get("variant") not in schedules or "ms" not in r:
            continue
        k, n = r["k"], r["n"]
        kernel, k, n = {"gmm": ("gmm", k, n), "gmm_dlhs": ("gmm_t", n, k),
                        "tgmm": ("tgmm", k, n)}[r["kernel"]]
        key = tuning.table_key(kernel, schedules[r["variant"]], k, n)
        if key not in best or r["ms"] < best[key][0]:
            best[key] = (r["ms"], tuple(r["tiling"]))
    return {key: tiling for key, (_, tiling) in best.items()}


def compare_consumers(json_path, write_table=False):
    """--consumers: one- against two-consumer kernels and the dense product
    at moe_1b's expert shapes (see the module docstring)."""
    m, g = MOE_1B["m"], MOE_1B["g"]
    rows, ok = [], {}
    for pingpong in (False, True):
        try:
            err = check("mosaic_gpu", consumers=2, pingpong=pingpong)
            ok[pingpong] = err < 2e-2
            rows.append(dict(kind="check", consumers=2, pingpong=pingpong, rel_err=err,
                             ok=ok[pingpong]))
        except Exception:
            ok[pingpong] = False
            rows.append(dict(kind="check", consumers=2, pingpong=pingpong,
                             error=traceback.format_exc()[-400:]))
        print(rows[-1], flush=True)
    header = (f"{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, M={m}, G={g}, "
              f"Dirichlet({MOE_1B['alpha']}) group sizes; TFLOP/s = 2*M*K*N a kernel "
              f"(3x that forward+backward)")
    for label, k, n in MOE_1B["shapes"]:
        lhs, rhs, cot = inputs(m, k, n, g, seed=0)
        sizes = group_sizes(m, g, MOE_1B["alpha"])
        flops = gmm_flops(m, k, n)
        shape = dict(kind="consumers", shape=f"{label} K={k} N={n}", k=k, n=n)
        rows.append(timed(dict(shape, kernel="dense einsum", variant="XLA"), flops,
                          jax.jit(dense), lhs, rhs))
        for name in KERNELS:
            default = (mosaic_gpu.DEFAULT_TGMM_TILING if name == "tgmm"
                       else mosaic_gpu.DEFAULT_TILING)
            variants = [("1 consumer", mosaic_gpu, default, False)] + [
                ("2 consumers", two_consumers, t, False)
                for t in (TUNE_TWO_CONSUMERS["tgmm" if name == "tgmm" else "gmm"]
                          if ok[False] else ())] + [
                ("2 in ping-pong", two_consumers, t, True)
                for t in (TUNE_PINGPONG if ok[True] and name != "tgmm" else ())]
            for variant, kernels, tiling, pingpong in variants:
                rows.append(timed(dict(shape, kernel=name, variant=variant, tiling=tiling), flops,
                                  kernel_fn(name, kernels, tiling, pingpong),
                                  *kernel_args(name, lhs, rhs, cot, sizes)))
        rows.append(timed(dict(shape, kernel="fwd+bwd", variant="dense einsum"), 3 * flops,
                          dense_fwd_bwd, lhs, rhs, cot))
        apis = [(1, False)] + [(2, pp) for pp in (False, True) if ok[pp]]
        for consumers, pingpong in apis:
            variant = f"API consumers={consumers}" + (" ping-pong" if pingpong else "")
            rows.append(timed(dict(shape, kernel="fwd+bwd", variant=variant), 3 * flops,
                              fwd_bwd("mosaic_gpu", consumers, pingpong), lhs, rhs, sizes, cot))
        if json_path:
            write_rows(json_path, header, rows)
        if write_table:  # after each shape, so a run cut short keeps what it timed
            entries = fastest_tilings(rows)
            tuning.write_entries(jax.devices()[0].device_kind, entries)
            print(f"wrote {len(entries)} entries to {tuning.TABLE_PATH}: {entries}", flush=True)
    print("\n" + header + "; % dense: of the dense einsum's TFLOP/s (forward, or forward+backward)")
    print(f"{'shape':20s} {'kernel':13s} {'variant':26s} {'tiling':16s} {'ms':>8s} {'TFLOP/s':>8s} "
          f"{'% dense':>8s}")
    dense_tflops = {(r["shape"], r["kernel"] == "fwd+bwd"): r.get("tflops") for r in rows
                    if r.get("variant") in ("XLA", "dense einsum")}
    for r in rows:
        if r["kind"] == "consumers":
            dense_tf = dense_tflops[r["shape"], r["kernel"] == "fwd+bwd"]
            result = (f"{r['ms']:8.3f} {r['tflops']:8.1f} "
                      f"{100 * r['tflops'] / dense_tf if dense_tf else float('nan'):8.0f}"
                      if "ms" in r else f"failed: {r['error'][:60]}")
            print(f"{r['shape']:20s} {r['kernel']:13s} {r['variant']:26s} "
                  f"{str(r.get('tiling', '')):16s} {result}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--tune", action="store_true", help="also time each kernel per tiling")
    parser.add_argument("--consumers", action="store_true",
                        help="only compare the one- and two-consumer kernels at moe_1b's shapes")
    parser.add_argument("--write-table", action="store_true",
                        help="with --consumers: record the fastest tilings in tuning_table.json")
    args = parser.parse_args()
    if args.write_table and not args.consumers:
        parser.error("--write-table records the --consumers comparison: pass --consumers")
    if args.consumers:
        compare_consumers(args.json, args.write_table)
        return
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
