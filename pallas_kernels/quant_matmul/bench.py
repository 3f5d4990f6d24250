"""Quantised matmul benchmark: the Pallas kernels against XLA peers, in one run.

    python -m pallas_kernels.quant_matmul.bench [--json PATH] [--size 8192]
        [--only matmul|int4] [--shapes KxN,...] [--quick] [--skip-mosaic]

* M=N=K=size: bf16 XLA matmul; w8a8 (XLA int8 dot with the scale epilogue,
  the portable Pallas kernel and the Hopper Mosaic GPU kernel; alone and with
  dynamic per-token quantisation of bf16 activations); XLA fp8 e4m3 dot with
  per-tensor scales; fp8 blockwise (1x128 / 128x128 scales: portable and
  Mosaic GPU kernels). Each kernel is swept over a few tilings (--quick: the
  first only) and its fastest correct one is reported.
* int4 weight-only decode, group 128, at batch 16, 4, 1 for each K x N of
  --shapes (default: Llama-3-8B's MLP up and down projections, 4096x14336 and
  14336x4096, and 8192x8192): the Mosaic GPU kernel (at its default K split
  and the other splits), the portable kernel, XLA's dequantise-then-dot and
  an XLA dot on bf16 weights, with achieved GB/s (packed weights + scales +
  activations + output) against a device-to-device copy measured in the same
  run (bytes read + written), and a copy of the kernel's bytes as 16 calls in
  one jit (what a transfer this short reaches). Times per call: each
  implementation's device time from a profiler trace (16 independent calls a
  jit, the kernels alone); where K == N also the wall clock in a decode-like
  chain (each call's output is the next call's x, 16 weight sets streamed in
  turn, 128 calls a jit), and for the Mosaic kernel as 16 independent calls a
  jit, whose host dispatch (several us per argument buffer) outlasts 16 short
  kernels. A problem and its transpose (K x N, then N x K) are also chained
  as pairs, as a decode step runs its MLP.
Each kernel's output is checked against its reference first. Times are medians
of timed repeats after warm-up, with device synchronisation.
"""
from __future__ import annotations

import argparse
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
# one. H100 sweeps at batch 16, K=N=8192 (us, whole call): portable 34-39 for
# (128, 4, 4, 3), (64, 8, 4, 3), (128, 8, 8, 3), (64, 4, 4, 4) (the first two
# kept); Mosaic 3 compute warpgroups 22-26, 2 warpgroups 23-28, x multicast to
# 2-block clusters no gain, block_n 128 34 (half the SMs).
INT4_CONFIGS = [(64, 8, 4, 3), (128, 4, 4, 3)]  # block_n, split_k, warps, stages
INT4_MOSAIC_SPLITS = (1, 2, 4)  # Mosaic K splits timed beside the default's
INT4_BATCHES = (16, 4, 1)
INT4_GROUP = 128
# Llama-3-8B's decode matmuls, K x N: the MLP's gate and up projections, its
# down projection, and a square one.
INT4_SHAPES = ((4096, 14336), (14336, 4096), (8192, 8192))


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


def read_seconds(nbytes: int, count: int) -> float:
    """Seconds an XLA sum takes to read ``nbytes`` of bf16, timed over
    ``count`` distinct arrays summed back to back in one jit (no L2 reuse):
    the floor of a kernel that reads this much, where launch and ramp-up
    rival the transfer."""
    arrays = [jnp.full((nbytes // 2,), i, jnp.bfloat16) for i in range(count)]
    sums = jax.jit(lambda xs: [jnp.sum(x, dtype=jnp.float32) for x in xs])
    return time_fn(sums, arrays) / count


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


def _int4_weights(K, N):
    """ROTATE distinct int4 weight sets (packed codes, scales) of a K x N
    problem, and 4 sets of the bf16 weights they encode (4 x 2KN bytes: each
    set comes back after the others have flushed L2)."""
    g = INT4_GROUP
    k = jax.random.split(jax.random.key(K * 31 + N), 2)
    packed = pack_int4(jax.random.randint(k[0], (K, N), -8, 8, jnp.int32))
    scales = jax.random.uniform(k[1], (K // g, N), jnp.float32, 0.001, 0.01)
    # Distinct weights per rotation slot: every byte value is a valid code pair.
    packs = [packed ^ jnp.uint8(r * 37 % 256) for r in range(ROTATE)]
    scale_sets = [scales * (1 + 0.01 * r) for r in range(ROTATE)]
    w = ref.dequantize_int4(packed, scales, group_size=g).astype(jnp.bfloat16)
    return packs, scale_sets, [w * (1 + 0.01 * r) for r in range(4)]


def _int4_kernels(K, N, M):
    """{name: [(config label, jitted fn(x, packed, scales))]} of the int4
    kernels of an M x K x N problem, each one's default first: the Mosaic
    kernel (Hopper only) unsplit, its default ("default"), and at
    default_split_k's proposal and each other valid split of INT4_MOSAIC_SPLITS
    ("split<n>"), the portable kernel at
    INT4_CONFIGS, and XLA's dequantise-then-dot."""
    g = INT4_GROUP
    kernels = {"int4_pallas": [
        (f"bn{bn}_split{sk}_w{nw}_s{ns}",
         jax.jit(lambda x, p, s, bn=bn, sk=sk, nw=nw, ns=ns: int4_weight_only_pallas(
             x, p, s, group_size=g, block_n=bn, split_k=sk, num_warps=nw, num_stages=ns)))
        for bn, sk, nw, ns in INT4_CONFIGS]}
    if compat.is_hopper() and not SKIP_MOSAIC:
        kt = int4_mosaic_gpu.default_block_k(K, g)
        default = int4_mosaic_gpu.default_split_k(M, N, K, g)
        splits = [None] + [s for s in sorted({default, *INT4_MOSAIC_SPLITS}) if s != 1
                           and int4_mosaic_gpu.split_problem(K, kt, s) is None]
        kernels["int4_mosaic"] = [
            ("default" if split is None else f"split{split}", jax.jit(
                lambda x, p, s, split=split: int4_mosaic_gpu.int4_weight_only_mosaic(
                    x, p, s, group_size=g, split_k=split)))
            for split in splits]
    kernels["xla_dequant_dot"] = [("", jax.jit(
        lambda x, p, s: ref.int4_weight_only_reference(x, p, s, group_size=g)))]
    return kernels


def _int4_problem(K, N, weights, bw):
    """({batch: {implementation: entry}}, {kernel: chosen config}) of one
    K x N problem: every implementation's device time per call (profiler
    trace, 16 independent calls a jit) and, where K == N, its time in a
    decode-like chain (chained_time) and, for the Mosaic kernel, as 16
    independent calls a jit. A kernel's variants are timed at the first batch
    (chained where K == N, else in device time) and later batches take the
    fastest. Peers: a copy of the same bytes and an XLA dot on bf16 weights."""
    packs, scale_sets, dense_weights = weights
    square, gpu = K == N, compat.platform() == "gpu"
    batches, chosen = {}, {}
    for M in INT4_BATCHES:
        xs = [jax.random.normal(jax.random.fold_in(jax.random.key(2), r), (M, K), jnp.bfloat16)
              for r in range(ROTATE)]
        sets = list(zip(xs, packs, scale_sets))
        nbytes = packs[0].nbytes + scale_sets[0].nbytes + xs[0].nbytes + M * N * 2
        want = ref.int4_weight_only_reference(*sets[0], group_size=INT4_GROUP)
        row = {}

        def timer(fn, sets=sets):  # device time where there is no chain (independent on CPU)
            if square:
                return chained_time(fn, sets)
            return rotated_device_time(fn, sets)[0] if gpu else rotated_time(fn, sets)

        for name, variants in _int4_kernels(K, N, M).items():
            if name in chosen:  # the first batch's fastest (a default split may differ)
                variants = [v for v in variants if v[0] == chosen[name]] or variants[:1]
            key = f"{name}_{K}x{N}_M{M}"
            best = best_of(key, variants, sets[0], lambda o, want=want: rel_err(o, want), row,
                           timer)
            if best is None:
                continue
            chosen.setdefault(name, best[0])
            entry = row[name] = row.pop(key)
            entry[_timing(square, gpu)] = entry.pop("seconds")
            fn = dict(variants)[best[0]]
            if name == "int4_mosaic":
                entry["split_k"] = (int4_mosaic_gpu.default_split_k(M, N, K, INT4_GROUP)
                                    if best[0] == "default" else int(best[0][len("split"):]))
                if square:
                    entry["independent_seconds"] = rotated_time(fn, sets)
            if square and gpu:
                _add_device_time(entry, fn, sets)
        # What a plain copy of the kernel's bytes reaches as 16 independent
        # calls in one jit (a copy has no x to chain): a transfer this size.
        # bf16 like copy_bandwidth's: XLA's uint8 elementwise op is slower than
        # the memory (1306 GB/s for these bytes on an H100).
        half = jnp.zeros((nbytes // 4,), jnp.bfloat16)
        copy = jax.jit(lambda a: a + jnp.bfloat16(1))
        copy_sets = [(half + r,) for r in range(ROTATE)]
        row["copy_same_bytes"] = dict(independent_seconds=rotated_time(copy, copy_sets))
        if gpu:
            _add_device_time(row["copy_same_bytes"], copy, copy_sets)
        dense = jax.jit(lambda x, w: jnp.dot(x, w))
        dense_sets = list(zip(xs, dense_weights))
        entry = row["bf16_weights_xla"] = dict(
            bytes=dense_weights[0].nbytes + xs[0].nbytes + M * N * 2)
        entry[_timing(square, gpu)] = timer(dense, dense_sets)
        if square and gpu:
            _add_device_time(entry, dense, dense_sets)
        for r in row.values():
            _bandwidths(r, r.get("bytes", nbytes), bw)
        batches[M] = row
    return batches, chosen


def _timing(square, gpu):
    """The entry key of the time _int4_problem's timer takes."""
    return "chained_seconds" if square else "device_seconds" if gpu else "independent_seconds"


def _int4_pair(a, b, weights, chosen, bw):
    """{batch: {implementation: entry}} of the problem a = (K, N) followed by
    b = (N, K) (a decode step's MLP up then down projection), chained: each
    pair's output is the next pair's x. Each kernel runs the configuration
    chosen for each problem."""
    batches = {}
    for M in INT4_BATCHES:
        xs = [jax.random.normal(jax.random.fold_in(jax.random.key(3), r), (M, a[0]),
                                jnp.bfloat16) for r in range(ROTATE)]
        sets = [(x, pa, sa, pb, sb) for x, pa, sa, pb, sb
                in zip(xs, *weights[a][:2], *weights[b][:2])]
        nbytes = sum(weights[p][0][0].nbytes + weights[p][1][0].nbytes + M * sum(p) * 2
                     for p in (a, b))
        kernels = {p: _int4_kernels(*p, M) for p in (a, b)}
        row = {}
        for name in kernels[a]:
            if name not in chosen[a] or name not in chosen[b]:
                continue  # it failed on one of the problems
            fa, fb = (dict(kernels[p][name]).get(chosen[p][name], kernels[p][name][0][1])
                      for p in (a, b))
            pair = jax.jit(lambda x, pa, sa, pb, sb, fa=fa, fb=fb: fb(fa(x, pa, sa), pb, sb))
            try:
                row[name] = dict(chained_seconds=chained_time(pair, sets), config=" then ".join(
                    c for c in (chosen[a][name], chosen[b][name]) if c))
            except Exception as e:  # noqa: BLE001 - reported, not fatal, as in best_of
                print(f"  {name} pair M={M}: failed: {type(e).__name__}: {str(e)[:200]}")
        dense = jax.jit(lambda x, wa, wb: jnp.dot(jnp.dot(x, wa), wb))
        row["bf16_weights_xla"] = dict(
            chained_seconds=chained_time(dense, list(zip(xs, weights[a][2], weights[b][2]))),
            bytes=2 * weights[a][2][0].nbytes + M * 2 * sum(a) * 2)
        for r in row.values():
            _bandwidths(r, r.get("bytes", nbytes), bw)
        batches[M] = row
    return batches


def _bandwidths(entry, nbytes, bw):
    """GB/s and share of the copy bandwidth bw of each time in entry."""
    for kind in ("chained", "device", "independent"):
        if f"{kind}_seconds" in entry:
            entry[f"{kind}_GBps"] = nbytes / entry[f"{kind}_seconds"] / 1e9
            entry[f"{kind}_of_copy"] = entry[f"{kind}_GBps"] * 1e9 / bw


def int4_suite(shapes, results, json_path=None):
    """int4 weight-only decode at each (K, N) of shapes and batch of
    INT4_BATCHES, and each problem followed by its transpose where both are
    in shapes (a decode MLP's up and down projections), chained;
    results["int4"] is written to json_path after every problem."""
    bw = copy_bandwidth()
    out = results["int4"] = {"copy_GBps": bw / 1e9, "group_size": INT4_GROUP, "problems": {}}
    weights, chosen = {}, {}

    def record(name, **problem):
        out["problems"][name] = problem
        if json_path:
            with open(json_path, "w") as f:
                json.dump(results, f, indent=1)
        print_int4_problem(name, problem, out["copy_GBps"])

    for K, N in shapes:
        weights[K, N] = _int4_weights(K, N)
        batches, chosen[K, N] = _int4_problem(K, N, weights[K, N], bw)
        record(f"{K}x{N}", K=K, N=N, batches=batches)
        if K != N and (N, K) in weights:
            (a, b) = sorted([(K, N), (N, K)], key=shapes.index)
            record(f"{a[0]}x{a[1]} then {b[0]}x{b[1]}", K=a[0], N=a[1], then=b,
                   batches=_int4_pair(a, b, weights, chosen, bw))


def print_int4_problem(name, problem, copy_gbps):
    """One problem's table: per batch and implementation, us per call and
    share of the copy bandwidth, chained, in device time and independent."""
    per = "pair of calls" if "then" in problem else "call"
    print(f"\nint4 weight-only {name} (K x N), group {INT4_GROUP}, us a {per}; "
          f"copy {copy_gbps:.0f} GB/s")
    print(f"{'batch':>5s} {'impl':20s} {'chain us':>8s} {'of copy':>8s} {'dev us':>8s} "
          f"{'of copy':>8s} {'indep us':>8s}  config")
    for M, row in problem["batches"].items():
        for impl, r in row.items():
            cells = []
            for kind in ("chained", "device"):
                t = r.get(f"{kind}_seconds")
                cells += ([f"{t * 1e6:8.1f}", f"{r[f'{kind}_of_copy']:8.0%}"] if t
                          else [f"{'-':>8s}"] * 2)
            t = r.get("independent_seconds")
            cells.append(f"{t * 1e6:8.1f}" if t else f"{'-':>8s}")
            config = r.get("config", "") + (f" (split_k {r['split_k']})" if "split_k" in r else "")
            print(f"{M:5d} {impl:20s} {' '.join(cells)}  {config}")


def parse_shapes(text):
    """--shapes: '4096x14336,14336x4096' -> ((4096, 14336), (14336, 4096));
    K a multiple of the group size, N of 64."""
    shapes = []
    for item in text.split(","):
        try:
            K, N = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not KxN (e.g. 4096x14336)") from None
        if K <= 0 or N <= 0 or K % INT4_GROUP or N % 64:
            raise argparse.ArgumentTypeError(f"{item!r}: K must be a positive multiple of "
                                             f"{INT4_GROUP} and N of 64")
        shapes.append((K, N))
    return tuple(shapes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (int4: after every problem)")
    parser.add_argument("--size", type=int, default=8192, help="M=N=K of the matmul suite")
    parser.add_argument("--shapes", type=parse_shapes, default=INT4_SHAPES,
                        help="int4 problems as KxN,KxN,... (default: "
                             + ",".join(f"{k}x{n}" for k, n in INT4_SHAPES) + ")")
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
        int4_suite(args.shapes, results, args.json)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{results['device']}, jax {results['jax']}")
    if args.only != "int4":
        print(f"{'matmul M=N=K=' + str(args.size):30s} {'ms':>8s} {'TFLOP/s':>8s} "
              f"{'vs bf16':>8s}  config")
    for name, r in results.items():
        if isinstance(r, dict) and "tflops" in r:
            print(f"{name:30s} {r['seconds'] * 1e3:8.3f} {r['tflops']:8.1f} "
                  f"{r['speedup_vs_bf16']:8.2f}  {r.get('config', '')}")
    if "int4" in results:
        i4 = results["int4"]
        print(f"\nint4 (us a call; chain: {CHAIN_REPEATS * ROTATE} calls a jit, each output the "
              f"next x; dev: the kernels' time in a profiler trace; indep: {ROTATE} "
              "independent calls a jit)")
        for name, problem in i4["problems"].items():
            print_int4_problem(name, problem, i4["copy_GBps"])


if __name__ == "__main__":
    main()
