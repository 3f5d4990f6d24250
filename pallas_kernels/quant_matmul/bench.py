"""Quantised matmul benchmark: the Pallas kernels against XLA peers, in one run.

    python -m pallas_kernels.quant_matmul.bench [--json PATH] [--size 8192]
        [--only matmul|int4] [--quick] [--skip-mosaic]

* M=N=K=size: bf16 XLA matmul; w8a8 (XLA int8 dot with the scale epilogue,
  the portable Pallas kernel and the Hopper Mosaic GPU kernel; alone and with
  dynamic per-token quantisation of bf16 activations); XLA fp8 e4m3 dot with
  per-tensor scales; fp8 blockwise (1x128 / 128x128 scales: portable and
  Mosaic GPU kernels). Each kernel is swept over a few tilings (--quick: the
  first only) and its fastest correct one is reported.
* int4 weight-only at batch 16, 4, 1 with K=N=size, group 128: achieved GB/s
  (packed weights + scales + activations + output) against a measured
  device-to-device copy bandwidth (bytes read + written), with the XLA
  dequantise-then-dot and a bf16 weight matmul as peers, and a copy moving the
  kernel's byte count timed as 16 calls in one jit (what a transfer this short
  reaches). Wall clock per call two ways: in a decode-like chain (each call's
  output is the next call's x, 16 weight sets streamed in turn, 128 calls a
  jit) and as 16 independent calls a jit, whose host dispatch (several us per
  argument buffer) outlasts 16 short kernels; on GPU also each one's device
  time from a profiler trace (the kernels alone).
Each kernel's output is checked against its reference first. Times are medians
of timed repeats after warm-up, with device synchronisation.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.benchmarking import device_kernel_seconds, rel_err, time_fn
from pallas_kernels.quant_matmul import int4_mosaic_gpu, mosaic_gpu
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul.fp8_blockwise import fp8_blockwise_pallas
from pallas_kernels.quant_matmul.int4_weight_only import int4_weight_only_pallas
from pallas_kernels.quant_matmul.packing import pack_int4
from pallas_kernels.quant_matmul.w8a8 import w8a8_pallas

QUICK = False  # --quick: only the first (default) configuration of each kernel
SKIP_MOSAIC = False  # --skip-mosaic: leave out the Hopper kernels
# Earlier H100 sweeps also tried (256, 128, 3), (128, 128, 4), (128, 256, 3, 4) for
# w8a8 (0.80-0.87 ms vs 0.72) and 3-stage fp8 (1.14 ms vs 1.08-1.13).
W8A8_TILINGS = [mosaic_gpu.WIDE_TILING, mosaic_gpu.Tiling(128, 256, 3, 16)]
# (128, 128, 5) was the H100's fastest before the wide tile (1.50x bf16 at 8192^3).
FP8_TILINGS = [mosaic_gpu.WIDE_TILING, mosaic_gpu.Tiling(128, 256, 3, 32),
               mosaic_gpu.SMALL_TILING, mosaic_gpu.Tiling(128, 128, 5)]
# int4 tilings are swept at the first batch only: the others take its fastest
# one. H100 sweeps at batch 16 (us, whole call):
# portable 34-39 for (128, 4, 4, 3), (64, 8, 4, 3), (128, 8, 8, 3), (64, 4, 4, 4)
# (the first two kept); Mosaic 3 compute warpgroups 22-26, 2 warpgroups 23-28,
# x multicast to 2-block clusters no gain, block_n 128 34 (half the SMs).
INT4_CONFIGS = [(64, 8, 4, 3), (128, 4, 4, 3)]  # block_n, split_k, warps, stages
INT4_MOSAIC_CONFIGS = [dict(compute_wgs=3), dict(compute_wgs=2)]  # int4_weight_only_mosaic options
INT4_BATCHES = (16, 4, 1)


def _tiling_label(t):
    return f"tm{t.tm}_tn{t.tn}_s{t.stages}_g{t.group_m}"


def best_of(name, variants, args, check, results, timer=None):
    """Time every variant that compiles and matches; record the fastest.
    timer(fn) -> seconds per call replaces time_fn(fn, *args) when given."""
    best = None
    variants = variants[:1] if QUICK else variants
    for label, fn in variants:
        try:
            err = check(fn(*args))
            t = timer(fn) if timer else time_fn(fn, *args)
        except Exception as e:  # a config that does not compile is reported, not fatal
            print(f"  {name} {label}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        print(f"  {name} {label}: {t * 1e3:.3f} ms (rel err {err:.1e})")
        if err > 2e-2:
            print(f"  {name} {label}: rejected, error too large")
            continue
        if best is None or t < best[1]:
            best = (label, t, err)
    if best is not None:
        results[name] = dict(config=best[0], seconds=best[1], rel_err=best[2])
    return best


def matmul_suite(size, results):
    M = N = K = size
    k = jax.random.split(jax.random.key(0), 6)
    flops = 2.0 * M * N * K
    x = jax.random.normal(k[0], (M, K), jnp.bfloat16)
    w = jax.random.normal(k[1], (N, K), jnp.bfloat16)
    bf16 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32
                                                   ).astype(jnp.bfloat16))
    results["bf16_xla"] = dict(seconds=time_fn(bf16, x, w))

    xq = jax.random.randint(k[2], (M, K), -127, 128, jnp.int32).astype(jnp.int8)
    wq = jax.random.randint(k[3], (N, K), -127, 128, jnp.int32).astype(jnp.int8)
    xs = jax.random.uniform(k[4], (M,), jnp.float32, 0.01, 0.1)
    ws = jax.random.uniform(k[5], (N,), jnp.float32, 0.01, 0.1)
    int8_xla = jax.jit(lambda *a: ref.w8a8_reference(*a))
    want = int8_xla(xq, xs, wq, ws)
    results["w8a8_xla_int8_dot"] = dict(seconds=time_fn(int8_xla, xq, xs, wq, ws))
    variants = [(f"bm{bm}_bn{bn}_bk{bk}_w{nw}_s{ns}",
                 jax.jit(lambda a, b, c, d, bm=bm, bn=bn, bk=bk, nw=nw, ns=ns: w8a8_pallas(
                     a, b, c, d, block_sizes=(bm, bn, bk), num_warps=nw, num_stages=ns)))
                for bm, bn, bk, nw, ns in [(128, 128, 128, 4, 4), (128, 256, 128, 8, 3)]]
    best_of("w8a8_pallas", variants, (xq, xs, wq, ws), lambda o: rel_err(o, want), results)
    mosaic = compat.is_hopper() and not SKIP_MOSAIC
    if mosaic:
        variants = [(_tiling_label(t), jax.jit(lambda *a, t=t: mosaic_gpu.w8a8_mosaic(*a, tiling=t)))
                    for t in W8A8_TILINGS]
        best_of("w8a8_mosaic", variants, (xq, xs, wq, ws), lambda o: rel_err(o, want), results)

    def quant_rows(x):
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
        s = jnp.where(amax > 0, amax / 127, 1.0)
        return jnp.clip(jnp.round(x / s[:, None]), -127, 127).astype(jnp.int8), s

    e2e_xla = jax.jit(lambda x, wq, ws: ref.w8a8_reference(*quant_rows(x), wq, ws))
    results["w8a8_xla_with_act_quant"] = dict(seconds=time_fn(e2e_xla, x, wq, ws))
    if "w8a8_pallas" in results:
        bm, bn, bk = (int(p[2:]) for p in results["w8a8_pallas"]["config"].split("_")[:3])
        e2e = jax.jit(lambda x, wq, ws: w8a8_pallas(*quant_rows(x), wq, ws,
                                                    block_sizes=(bm, bn, bk)))
        results["w8a8_pallas_with_act_quant"] = dict(seconds=time_fn(e2e, x, wq, ws))
    if "w8a8_mosaic" in results:
        t = {_tiling_label(t): t for t in W8A8_TILINGS}[results["w8a8_mosaic"]["config"]]
        e2e = jax.jit(lambda x, wq, ws: mosaic_gpu.w8a8_mosaic(*quant_rows(x), wq, ws, tiling=t))
        results["w8a8_mosaic_with_act_quant"] = dict(seconds=time_fn(e2e, x, wq, ws))

    xf = (jax.random.normal(k[0], (M, K)) * 60).astype(jnp.float8_e4m3fn)
    wf = (jax.random.normal(k[1], (N, K)) * 60).astype(jnp.float8_e4m3fn)
    fp8_xla = jax.jit(lambda a, b, sa, sb: (jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * (sa * sb)
    ).astype(jnp.bfloat16))
    results["fp8_xla_per_tensor"] = dict(seconds=time_fn(fp8_xla, xf, wf, jnp.float32(0.01),
                                                       jnp.float32(0.02)))
    nk = K // 128
    fxs = jax.random.uniform(k[4], (M, nk), jnp.float32, 0.01, 0.1)
    fws = jax.random.uniform(k[5], (N // 128, nk), jnp.float32, 0.01, 0.1)
    rows = slice(0, 256)  # the reference materialises per-block partials: check a row slice
    want = ref.fp8_blockwise_reference(xf[rows], fxs[rows], wf, fws)
    variants = [(f"bm{bm}_bn{bn}_w{nw}_s{ns}",
                 jax.jit(lambda a, b, c, d, bm=bm, bn=bn, nw=nw, ns=ns: fp8_blockwise_pallas(
                     a, b, c, d, block_sizes=(bm, bn), num_warps=nw, num_stages=ns)))
                for bm, bn, nw, ns in [(128, 128, 8, 3), (128, 128, 4, 4)]]
    best_of("fp8_blockwise_pallas", variants, (xf, fxs, wf, fws),
            lambda o: rel_err(o[rows], want), results)
    if mosaic:
        variants = [(_tiling_label(t),
                     jax.jit(lambda *a, t=t: mosaic_gpu.fp8_blockwise_mosaic(*a, tiling=t)))
                    for t in FP8_TILINGS]
        best_of("fp8_blockwise_mosaic", variants, (xf, fxs, wf, fws),
                lambda o: rel_err(o[rows], want), results)
    for r in results.values():
        if isinstance(r, dict) and "seconds" in r:
            r["tflops"] = flops / r["seconds"] / 1e12
            r["speedup_vs_bf16"] = results["bf16_xla"]["seconds"] / r["seconds"]


def copy_bandwidth():
    a = jax.random.normal(jax.random.key(9), (256 * 1024 * 1024,), jnp.bfloat16)  # 512 MiB
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    return 2 * a.nbytes / time_fn(copy, a)


ROTATE = 16  # int4 weight sets per timed call (16 x 34 MB: far more than L2)


def rotated_time(fn, arg_sets):
    """Seconds per call of fn, timed as one jitted call over all arg_sets:
    each call streams different weights (no L2 reuse), and one host dispatch
    covers ROTATE kernels (a decode kernel of ~15 us is shorter than a
    dispatch)."""
    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    return time_fn(many, arg_sets) / len(arg_sets)


CHAIN_REPEATS = 8  # passes over the ROTATE weight sets in one chained jit


def chained_time(fn, arg_sets, repeats=CHAIN_REPEATS):
    """Seconds per call of fn(x, *weights) -> y (y shaped like x) run as a
    decode step runs its layers: one jit chains repeats * len(arg_sets)
    calls, each call's output feeding the next call's x, the weight sets
    taken in turn (a set comes back after all the others have streamed
    through L2). A profiler trace shows kernels inside one jit run back to
    back, but dispatching a jit costs the host several us per argument
    buffer, more than a 16 us kernel; the chain spreads that over `repeats` uses."""
    x0 = arg_sets[0][0]
    y = jax.eval_shape(fn, *arg_sets[0])
    if (y.shape, y.dtype) != (x0.shape, x0.dtype):
        raise ValueError(f"chained_time needs an output shaped like x {x0.shape} {x0.dtype}; "
                         f"got {y.shape} {y.dtype} (a square K == N problem)")
    return time_fn(jax.jit(chain(fn, repeats)), x0, arg_sets) / (repeats * len(arg_sets))


def chain(fn, repeats):
    """(x, arg_sets) -> x after repeats passes of x = fn(x, *weights) over
    the sets (each set's own x is not used)."""
    def run(x, sets):
        for _ in range(repeats):
            for _, *weights in sets:
                x = fn(x, *weights)
        return x
    return run


DEVICE_CALLS = 3  # traced calls for the device times


def rotated_device_time(fn, arg_sets):
    """Device seconds per weight set of fn, run as in rotated_time, from a
    profiler trace (every kernel of the call counts, XLA ops around the
    kernel too), and {kernel name: (launches, median seconds)}."""
    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    kernels = device_kernel_seconds(many, arg_sets, calls=DEVICE_CALLS)
    per_set = sum(map(sum, kernels.values())) / (DEVICE_CALLS * len(arg_sets))
    return per_set, {name: (len(t), statistics.median(t)) for name, t in kernels.items()}


def _add_device_time(entry, fn, arg_sets):
    """entry["device_seconds"] (and its kernels) where a trace can be taken;
    a failure is printed and recorded, not fatal."""
    try:
        entry["device_seconds"], entry["kernels"] = rotated_device_time(fn, arg_sets)
    except Exception as e:  # noqa: BLE001 - the wall-clock numbers stand without it
        entry["device_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  device time failed: {entry['device_error']}")


def int4_suite(size, results):
    K = N = size
    g = 128
    k = jax.random.split(jax.random.key(1), 4)
    codes = jax.random.randint(k[0], (K, N), -8, 8, jnp.int32)
    packed = pack_int4(codes)
    scales = jax.random.uniform(k[1], (K // g, N), jnp.float32, 0.001, 0.01)
    w_bf16 = ref.dequantize_int4(packed, scales, group_size=g).astype(jnp.bfloat16)
    bw = copy_bandwidth()
    out = {"copy_GBps": bw / 1e9, "batches": {}}
    # Distinct weights per rotation slot: every byte value is a valid code pair.
    packs = [packed ^ jnp.uint8(r * 37 % 256) for r in range(ROTATE)]
    scale_sets = [scales * (1 + 0.01 * r) for r in range(ROTATE)]
    chosen = {}  # kernel -> its fastest label at the first batch

    def sweep(name, variants, M, *args):
        if name in chosen:
            variants = [v for v in variants if v[0] == chosen[name]]
        best = best_of(f"{name}_M{M}", variants, *args)
        if best is not None:
            chosen.setdefault(name, best[0])

    for M in INT4_BATCHES:
        xs = [jax.random.normal(jax.random.fold_in(k[2], r), (M, K), jnp.bfloat16)
              for r in range(ROTATE)]
        sets = list(zip(xs, packs, scale_sets))
        x = xs[0]
        nbytes = packed.nbytes + scales.nbytes + x.nbytes + M * N * 2
        want = ref.int4_weight_only_reference(x, packed, scales, group_size=g)
        row = {}
        timer = functools.partial(chained_time, arg_sets=sets)
        variants = [(f"bn{bn}_split{sk}_w{nw}_s{ns}",
                     jax.jit(lambda x, p, s, bn=bn, sk=sk, nw=nw, ns=ns: int4_weight_only_pallas(
                         x, p, s, group_size=g, block_n=bn, split_k=sk, num_warps=nw,
                         num_stages=ns)))
                    for bn, sk, nw, ns in INT4_CONFIGS]
        sweep("int4_pallas", variants, M, (x, packed, scales),
              lambda o, want=want: rel_err(o, want), row, timer)
        if compat.is_hopper() and not SKIP_MOSAIC:
            variants = [("_".join(f"{name}{value}" for name, value in opts.items()),
                         jax.jit(lambda x, p, s, opts=opts:
                                 int4_mosaic_gpu.int4_weight_only_mosaic(
                                     x, p, s, group_size=g, **opts)))
                        for opts in INT4_MOSAIC_CONFIGS]
            sweep("int4_mosaic", variants, M, (x, packed, scales),
                  lambda o, want=want: rel_err(o, want), row, timer)
            key = f"int4_mosaic_M{M}"  # best_of's entry for the fastest variant
            if key in row:
                best = dict(variants)[row[key]["config"]]
                row[key]["independent_seconds"] = rotated_time(best, sets)
                _add_device_time(row[key], best, sets)
        xla = jax.jit(lambda x, p, s: ref.int4_weight_only_reference(x, p, s, group_size=g))
        row["xla_dequant_dot"] = dict(seconds=chained_time(xla, sets[:4]))
        # What a plain copy of the kernel's bytes reaches as 16 independent
        # calls in one jit (a copy has no x to chain): a transfer this size.
        # bf16 like copy_bandwidth's: XLA's uint8 elementwise op is slower than
        # the memory (1306 GB/s for these bytes on an H100).
        half = jnp.zeros((nbytes // 4,), jnp.bfloat16)
        copy = jax.jit(lambda a: a + jnp.bfloat16(1))
        copy_sets = [(half + r,) for r in range(ROTATE)]
        row["copy_same_bytes"] = dict(seconds=rotated_time(copy, copy_sets),
                                      timing="16 independent calls a jit")
        if compat.platform() == "gpu":
            _add_device_time(row["copy_same_bytes"], copy, copy_sets)
        dense = jax.jit(lambda x, w: jnp.dot(x, w))
        row["bf16_weights_xla"] = dict(seconds=chained_time(dense, [(x, w_bf16 * (1 + 0.01 * r))
                                                                    for r in range(4)]),
                                       bytes=w_bf16.nbytes + x.nbytes + M * N * 2)
        for name, r in row.items():
            r["GBps"] = r.get("bytes", nbytes) / r["seconds"] / 1e9
            r["fraction_of_copy_bw"] = r["GBps"] * 1e9 / bw
            if "device_seconds" in r:
                r["device_GBps"] = r.get("bytes", nbytes) / r["device_seconds"] / 1e9
                r["device_fraction_of_copy_bw"] = r["device_GBps"] * 1e9 / bw
        out["batches"][M] = row
    results["int4"] = out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--quick", action="store_true",
                        help="one configuration per kernel (a short run)")
    parser.add_argument("--skip-mosaic", action="store_true",
                        help="leave out the Mosaic GPU kernels (e.g. while one is broken)")
    parser.add_argument("--only", choices=("matmul", "int4"),
                        help="run one suite: the M=N=K matmuls or int4 weight-only decode")
    args = parser.parse_args()
    global QUICK, SKIP_MOSAIC
    QUICK, SKIP_MOSAIC = args.quick, args.skip_mosaic
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "size": args.size}
    if args.only != "int4":
        matmul_suite(args.size, results)
    if args.only != "matmul":
        int4_suite(args.size, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{results['device']}, jax {results['jax']}, M=N=K={args.size}")
    if args.only != "int4":
        print(f"{'matmul':30s} {'ms':>8s} {'TFLOP/s':>8s} {'vs bf16':>8s}  config")
    for name, r in results.items():
        if isinstance(r, dict) and "tflops" in r:
            print(f"{name:30s} {r['seconds'] * 1e3:8.3f} {r['tflops']:8.1f} "
                  f"{r['speedup_vs_bf16']:8.2f}  {r.get('config', '')}")
    if "int4" not in results:
        return
    i4 = results["int4"]
    print(f"\nint4 weight-only, K=N={args.size}, group 128; copy bandwidth "
          f"{i4['copy_GBps']:.0f} GB/s")
    print(f"(us, GB/s: wall clock per call in a chain of {CHAIN_REPEATS * ROTATE} calls a jit "
          f"(copy: {ROTATE} independent calls); indep: {ROTATE} independent calls a jit; "
          "device: the kernels' own time in a profiler trace)")
    print(f"{'batch':>5s} {'impl':28s} {'us':>8s} {'GB/s':>8s} {'of copy':>8s} {'indep us':>8s} "
          f"{'dev us':>8s} {'of copy':>8s}  config")
    for M, row in i4["batches"].items():
        for name, r in row.items():
            dev = (f"{r['device_seconds'] * 1e6:8.1f} {r['device_fraction_of_copy_bw']:8.0%}"
                   if "device_seconds" in r else f"{'-':>8s} {'-':>8s}")
            indep = (f"{r['independent_seconds'] * 1e6:8.1f}" if "independent_seconds" in r
                     else f"{'-':>8s}")
            print(f"{M:5d} {name:28s} {r['seconds'] * 1e6:8.1f} {r['GBps']:8.0f} "
                  f"{r['fraction_of_copy_bw']:8.0%} {indep} {dev}  {r.get('config', '')}")


if __name__ == "__main__":
    main()
