"""Attention benchmark: TFLOP/s forward and forward+backward, one run, same GPU.

    python -m pallas_kernels.attention.bench [--json PATH] [--quick] [--match TEXT]

Implementations: 'pallas' (our Mosaic GPU kernel), 'cudnn'
(jax.nn.dot_product_attention), 'xla' (the jitted reference) and 'jax-mgpu'
(jax's own Pallas Mosaic GPU attention op, as a peer, where importable).
Each is checked against cuDNN (or the reference where cuDNN fails or does
not apply) before it is timed; failures are printed in the table instead of stopping the run.
FLOPs follow ``reference.attention_flops`` (backward = 2.5x forward); rows with
segment ids count the causal mask's FLOPs (the blocks the kernel visits).

Timing: ``--iters`` samples per implementation, split into ``--rounds`` rounds
that each visit every implementation in turn. TF/s come from the median
round; "x cudnn" is the median over rounds of cuDNN's time over this one's in
the same round, so drift within the process does not favour either side.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import mosaic_gpu
from pallas_kernels.attention.reference import attention_flops, attention_reference
from pallas_kernels.benchmarking import rel_err, time_fn

# name, B, S, H, KH, D, causal[, options: softcap, segments (packed documents
# per row, random lengths)]. cuDNN (through jax.nn.dot_product_attention)
# takes neither option, so those rows compare against the reference and
# against the plain causal row above them.
SHAPES = [
    ("B4 S4096 H16 D128 causal", 4, 4096, 16, 16, 128, True),
    ("B4 S4096 H16 D128 full", 4, 4096, 16, 16, 128, False),
    ("B1 S16384 H16 D128 causal", 1, 16384, 16, 16, 128, True),
    ("B4 S4096 H32/KH8 D128 causal", 4, 4096, 32, 8, 128, True),
    ("B4 S4096 H32 D64 causal", 4, 4096, 32, 32, 64, True),
    ("B4 S4096 H8 D256 causal", 4, 4096, 8, 8, 256, True),
    ("B4 S4096 H16 D128 causal cap30", 4, 4096, 16, 16, 128, True, dict(softcap=30.0)),
    ("B4 S4096 H16 D128 causal 4 docs", 4, 4096, 16, 16, 128, True, dict(segments=4)),
]
# The float32 reference materialises B*H*S*T logits several times over.
_REFERENCE_MAX_LOGITS = 2**30


def random_inputs(key, B, S, T, H, KH, D, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, S, H, D), jnp.float32).astype(dtype),
            jax.random.normal(kk, (B, T, KH, D), jnp.float32).astype(dtype),
            jax.random.normal(kv, (B, T, KH, D), jnp.float32).astype(dtype))


def _jax_mgpu(causal, D):
    """jax's own Mosaic GPU attention op, with the first config that fits."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    block_kv = 64 if D == 256 else 128
    cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal,
                          block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    # It takes float16 only (its tiles live in float16 scratch) and applies no
    # softmax scale: the scale is folded into q here (an elementwise pass).
    def run(q, k, v):
        q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        out = am.attention(*(x.astype(jnp.float16) for x in (q, k, v)), cfg)
        return out.astype(k.dtype)
    return run


def implementations(causal, D, softcap=None, segment_ids=None):
    kw = dict(causal=causal, logit_softcap=softcap, segment_ids=segment_ids)
    impls = {
        "pallas": lambda q, k, v: mosaic_gpu.mosaic_flash_attention(q, k, v, **kw),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"),
        "xla": lambda q, k, v: attention_reference(q, k, v, **kw),
    }
    if softcap is not None or segment_ids is not None:
        return {n: impls[n] for n in ("pallas", "xla")}
    try:
        impls["jax-mgpu"] = _jax_mgpu(causal, D)
    except Exception as e:  # noqa: BLE001 - the peer is optional
        print(f"jax-mgpu peer unavailable: {type(e).__name__}: {e}")
    return impls


def _short(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:90]}" if str(e) else type(e).__name__


def bench_shape(name, B, S, H, KH, D, causal, opts=None, impls_filter=None, iters=20, rounds=4):
    opts = opts or {}
    q, k, v = random_inputs(jax.random.key(hash(name) % 2**31), B, S, S, H, KH, D, jnp.bfloat16)
    do = jax.random.normal(jax.random.key(7), q.shape, jnp.float32).astype(jnp.bfloat16)
    segment_ids = None
    if "segments" in opts:
        ids = jnp.sort(jax.random.randint(jax.random.key(8), (B, S), 0, opts["segments"]), axis=1)
        segment_ids = (ids, ids)
    impls = implementations(causal, D, opts.get("softcap"), segment_ids)
    if impls_filter:
        impls = {n: f for n, f in impls.items() if n in impls_filter}
    fwd_flops = attention_flops(B, S, S, H, D, causal=causal)
    all_flops = attention_flops(B, S, S, H, D, causal=causal, with_backward=True)

    def vjp_all(f):
        def run(q, k, v, do):
            out, pull = jax.vjp(f, q, k, v)
            return (out, *pull(do))
        return jax.jit(run)

    # Correctness: every implementation against a trusted one (cuDNN, else the reference).
    results, outputs = {}, {}
    for impl, f in impls.items():
        if impl == "xla" and B * H * S * S > _REFERENCE_MAX_LOGITS:
            results[impl] = {"error": "skipped: reference logits too large for memory"}
            continue
        try:
            outputs[impl] = [np.asarray(x.astype(jnp.float32)) for x in vjp_all(f)(q, k, v, do)]
            results[impl] = {}
        except Exception as e:  # noqa: BLE001 - reported in the table
            try:  # some (jax-mgpu causal) have a forward but no backward
                outputs[impl] = [np.asarray(jax.jit(f)(q, k, v).astype(jnp.float32))]
                results[impl] = {"bwd_error": _short(e)}
            except Exception as e2:  # noqa: BLE001
                results[impl] = {"error": _short(e2)}
                traceback.print_exc(limit=3)
    trusted = "cudnn" if "cudnn" in outputs and len(outputs["cudnn"]) == 4 else "xla"
    for impl, outs in outputs.items():
        if trusted in outputs:
            errs = [rel_err(a, b) for a, b in zip(outs, outputs[trusted])]
            results[impl]["rel_err_vs_" + trusted] = dict(zip(("out", "dq", "dk", "dv"), errs))
    del outputs

    # Compile everything first, then time in rounds that visit every
    # implementation in turn: timings drift by 5-10% within a process on the
    # GPU, so the ratios compare times of the same round.
    timed = {}
    for impl, f in impls.items():
        r = results[impl]
        if "error" in r:
            continue
        try:
            fwd = jax.jit(f)
            jax.block_until_ready(fwd(q, k, v))
            timed[impl, "fwd"] = fwd
        except Exception as e:  # noqa: BLE001
            r["error"] = _short(e)
            continue
        if "bwd_error" in r:
            continue
        try:
            loss = lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum()
            fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            jax.block_until_ready(fb(q, k, v))
            timed[impl, "fwdbwd"] = fb
        except Exception as e:  # noqa: BLE001
            r["bwd_error"] = _short(e)
    flops = {"fwd": fwd_flops, "fwdbwd": all_flops}
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for (impl, kind), fn in list(timed.items()):
            try:
                t = time_fn(fn, q, k, v, iters=per_round)
            except Exception as e:  # noqa: BLE001 - reported in the table
                results[impl]["error" if kind == "fwd" else "bwd_error"] = _short(e)
                results[impl].pop(kind + "_round_ms", None)
                del timed[impl, kind]
                continue
            results[impl].setdefault(kind + "_round_ms", []).append(t * 1e3)
    for impl, kind in timed:
        r = results[impl]
        r[kind + "_ms"] = statistics.median(r[kind + "_round_ms"])
        r[kind + "_tflops"] = flops[kind] / r[kind + "_ms"] / 1e9
    return results


def speedup(r, base, kind):
    """Median over the rounds of base's time / r's time in the same round
    (kind "fwd" or "fwdbwd"); None where either was not timed."""
    mine, theirs = r.get(kind + "_round_ms"), base.get(kind + "_round_ms")
    if not mine or not theirs:
        return None
    return statistics.median(b / m for m, b in zip(mine, theirs))


def format_table(all_results):
    lines = [f"{'shape':32s} {'impl':9s} {'fwd TF/s':>9s} {'x cudnn':>7s} {'f+b TF/s':>9s} "
             f"{'x cudnn':>7s}  rel err vs cudnn |x-ref|/|ref| (out,dq,dk,dv) / note"]
    for shape, results in all_results.items():
        base = results.get("cudnn", {})
        for impl, r in results.items():
            def cell(key):
                v = r.get(key)
                return f"{v:9.1f}" if v is not None else f"{'-':>9s}"

            def ratio(kind):
                return f"{x:7.2f}" if (x := speedup(r, base, kind)) is not None else f"{'-':>7s}"
            errs = [v for k, v in r.items() if k.startswith("rel_err")]
            note = r.get("error") or ""
            if errs:
                note = " ".join(f"{x:.1e}" for x in errs[0].values()) + " " + note
            if "bwd_error" in r:
                note += f" [bwd: {r['bwd_error']}]"
            lines.append(f"{shape:32s} {impl:9s} {cell('fwd_tflops')} {ratio('fwd')} "
                         f"{cell('fwdbwd_tflops')} {ratio('fwdbwd')}  {note}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--match", help="only the shapes whose name contains this text")
    parser.add_argument("--impls", help="comma-separated subset of implementations")
    parser.add_argument("--iters", type=int, default=20, help="timed samples per implementation")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the samples are split into this many rounds over all implementations")
    args = parser.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.match:
        shapes = [s for s in shapes if args.match in s[0]]
    impls = args.impls.split(",") if args.impls else None
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "dtype": "bfloat16"}
    print(meta, flush=True)
    all_results = {}
    for name, *shape in shapes:
        t0 = time.perf_counter()
        all_results[name] = bench_shape(name, *shape, impls_filter=impls, iters=args.iters,
                                        rounds=args.rounds)
        print(f"{name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.json:  # written after every shape, so a cut-off run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": all_results}, f, indent=1)
    print(format_table(all_results))


if __name__ == "__main__":
    main()
