"""Block-sparse attention benchmark: forward and forward+backward time against
dense causal flash attention, one run, same GPU.

    python -m pallas_kernels.block_sparse_attention.bench [--json PATH] [--quick]

Problem (defaults): B1, H16 query / 8 kv heads, D128, causal, bf16, at
S = 16k, 32k, 64k, 128k, keeping 1, 1/2, 1/4, 1/8 and 1/16 of each query
block's causal key blocks. Lists (one per kv head, shared by its query heads,
built once outside the timing; selection policies live elsewhere): a sliding
window of the nearest blocks (half the budget), a sink block (block 0) and
random blocks for the rest (``causal_lists``).

Implementations: 'bsa-mosaic' (the Hopper forward and backward;
implementation='mosaic_gpu'), 'bsa-hopper-fwd' (the Hopper forward with the
portable backward), 'bsa-blockspec' (the portable kernels),
'bsa-xla' (the reference, small problems only), and the dense baselines
'dense-pallas' (flash_attention(implementation='pallas')), 'dense-cudnn'
(jax.nn.dot_product_attention's cuDNN path) and 'dense-xla' (the attention
reference, small problems only). Times are medians of --rounds rounds that
visit every implementation in turn; "x dense" is dense-pallas's median over
this one's. Correctness: keeping every block must give dense attention
(compared with dense-pallas, else dense-xla); at other keeps each block-sparse
kernel is compared with bsa-blockspec (or bsa-xla where it runs). Failures
are printed in the table instead of stopping the run.

Off GPU the Pallas kernels run interpreted: ``--seq-lens 256 --heads 2
--kv-heads 1 --head-dim 32 --block-q 32 --block-k 32 --dtype float32`` runs
the whole script on a CPU in seconds.
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

from pallas_kernels.attention import attention_reference, flash_attention
from pallas_kernels.benchmarking import rel_err, time_fn
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from pallas_kernels.block_sparse_attention.lists import canonical_lists
from pallas_kernels.block_sparse_attention.mosaic_gpu import mosaic_block_sparse_attention

SEQ_LENS = (16384, 32768, 65536, 131072)
KEEPS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
# The references materialise B*H*S*T float32 logits several times over.
_REFERENCE_MAX_LOGITS = 2**28


def last_causal_blocks(q_len, block_q, block_k):
    """The last key block each query block's causal mask reaches (S == T)."""
    nQ = -(-q_len // block_q)
    return (np.arange(nQ) * block_q + block_q - 1) // block_k


def causal_lists(key, *, q_len, list_heads, block_q, block_k, keep):
    """(indices [1, list_heads, nQ, M], counts [1, list_heads, nQ]) keeping
    ``keep`` of each query block's causal key blocks (at least one): the
    nearest blocks up to half the budget (the window, its own diagonal block
    first), then key block 0 (the sink), then random earlier blocks."""
    nQ, nK = -(-q_len // block_q), -(-q_len // block_k)
    last = last_causal_blocks(q_len, block_q, block_k)
    budget = np.maximum(1, np.round(keep * (last + 1))).astype(np.int32)
    j = jnp.arange(nK)
    i_last, budget_j = jnp.asarray(last)[:, None], jnp.asarray(budget)[:, None]
    score = jax.random.uniform(key, (list_heads, nQ, nK))
    score += 4.0 * (j > i_last - (budget_j + 1) // 2) + 2.0 * (j == 0)
    score = jnp.where(j <= i_last, score, -1.0)
    _, indices = jax.lax.top_k(score, int(budget.max()))
    counts = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), (list_heads, nQ))
    return indices[None].astype(jnp.int32), counts[None]


def kept_flops(counts, *, heads, list_heads, block_q, block_k, head_dim):
    """Matmul FLOPs of the forward over the listed blocks (whole blocks)."""
    return 4.0 * float(jnp.sum(counts)) * (heads // list_heads) * block_q * block_k * head_dim


def implementations(indices, counts, block_q, block_k, on_gpu, small):
    sparse = dict(block_q=block_q, block_k=block_k, causal=True)

    def bsa(name):
        return lambda q, k, v: block_sparse_attention(q, k, v, indices, counts, **sparse,
                                                      implementation=name)
    impls = {"bsa-mosaic": bsa("mosaic_gpu"), "bsa-blockspec": bsa("blockspec")}
    if on_gpu:  # the lists made canonical in the timed call, as the api does
        impls["bsa-hopper-fwd"] = lambda q, k, v: mosaic_block_sparse_attention(
            q, k, v, *canonical_lists(indices, counts, -(-k.shape[1] // block_k)), **sparse,
            hopper_backward=False)
    if small:
        impls["bsa-xla"] = bsa("xla")
    impls["dense-pallas"] = lambda q, k, v: flash_attention(q, k, v, causal=True,
                                                            implementation="pallas")
    if on_gpu:
        impls["dense-cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    if small:
        impls["dense-xla"] = lambda q, k, v: attention_reference(q, k, v, causal=True)
    return impls


def _short(e):
    text = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _checked(impls, q, k, v, keep):
    """{impl: results} with each implementation's output compared with a
    trusted one; impls that fail are marked and dropped from ``impls``."""
    results, outs = {}, {}
    for name, f in list(impls.items()):
        try:
            outs[name] = jax.jit(f)(q, k, v)
            results[name] = {}
        except Exception as e:  # noqa: BLE001 - reported in the table
            results[name] = {"error": _short(e)}
            del impls[name]
            traceback.print_exc(limit=2)
    dense = "dense-pallas" if "dense-pallas" in outs else "dense-xla"
    sparse = "bsa-xla" if "bsa-xla" in outs else "bsa-blockspec"
    for name, out in outs.items():
        trusted = dense if keep == 1.0 or name.startswith("dense") else sparse
        if trusted in outs and trusted != name:
            results[name]["rel_err"] = rel_err(out, outs[trusted])
            results[name]["vs"] = trusted
    return results


def bench_problem(S, keep, args, impls_filter=None):
    """Results {impl: {...}} of one sequence length and keep fraction."""
    B, H, KH, D = 1, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    key = jax.random.key(S)
    kq, kk, kv, kl, kd = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, S, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, KH, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, KH, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, q.shape, jnp.float32).astype(dtype)
    list_heads = KH if args.lists == "kv" else H
    indices, counts = causal_lists(kl, q_len=S, list_heads=list_heads, block_q=args.block_q,
                                   block_k=args.block_k, keep=keep)
    impls = implementations(indices, counts, args.block_q, args.block_k, on_gpu,
                            small=B * H * S * S <= _REFERENCE_MAX_LOGITS)
    if impls_filter:
        impls = {n: f for n, f in impls.items() if n in impls_filter}
    results = _checked(impls, q, k, v, keep)

    timed = {}
    for name, f in impls.items():
        timed[name, "fwd"] = jax.jit(f)

        def loss(q, k, v, f=f):
            out = f(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
        timed[name, "fwdbwd"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for (name, kind), fn in list(timed.items()):
        try:
            jax.block_until_ready(fn(q, k, v))
        except Exception as e:  # noqa: BLE001
            results[name]["error" if kind == "fwd" else "bwd_error"] = _short(e)
            del timed[name, kind]
    per_round = max(1, args.iters // args.rounds)
    for _ in range(args.rounds):
        for (name, kind), fn in list(timed.items()):
            t = time_fn(fn, q, k, v, iters=per_round, warmup=1)
            results[name].setdefault(kind + "_round_ms", []).append(t * 1e3)
    flops = kept_flops(counts, heads=H, list_heads=list_heads, block_q=args.block_q,
                       block_k=args.block_k, head_dim=D)
    for name, kind in timed:
        r = results[name]
        r[kind + "_ms"] = statistics.median(r[kind + "_round_ms"])
        if name.startswith("bsa"):  # backward = 2.5x forward, as attention_flops
            r[kind + "_tflops"] = flops * (1.0 if kind == "fwd" else 3.5) / r[kind + "_ms"] / 1e9
    causal = (last_causal_blocks(S, args.block_q, args.block_k) + 1).sum() * list_heads
    results["lists"] = {"max_blocks": int(indices.shape[-1]),
                        "kept": float(jnp.sum(counts)) / float(causal)}
    return results


def format_table(all_results):
    lines = [f"{'S':>7s} {'keep':>6s} {'impl':14s} {'fwd ms':>9s} {'x dense':>7s} "
             f"{'f+b ms':>9s} {'x dense':>7s} {'TF/s f+b':>8s}  rel err / note"]
    for label, results in all_results.items():
        S, keep = label.split("/", 1)
        dense = results.get("dense-pallas", {})
        for name, r in results.items():
            if name == "lists":
                continue

            def ms(kind):
                return f"{r[kind + '_ms']:9.3f}" if kind + "_ms" in r else f"{'-':>9s}"

            def ratio(kind):
                if kind + "_ms" in r and kind + "_ms" in dense:
                    return f"{dense[kind + '_ms'] / r[kind + '_ms']:7.2f}"
                return f"{'-':>7s}"
            tf = f"{r['fwdbwd_tflops']:8.1f}" if "fwdbwd_tflops" in r else f"{'-':>8s}"
            note = f"{r['rel_err']:.1e} vs {r['vs']}" if "rel_err" in r else ""
            for key in ("error", "bwd_error"):
                if key in r:
                    note += f" [{key}: {r[key]}]"
            lines.append(f"{S:>7s} {keep:>6s} {name:14s} {ms('fwd')} {ratio('fwd')} "
                         f"{ms('fwdbwd')} {ratio('fwdbwd')} {tf}  {note}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here (after every problem)")
    parser.add_argument("--quick", action="store_true", help="S=16k, keeps 1/2 and 1/8 only")
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)))
    parser.add_argument("--keeps", default="1,1/2,1/4,1/8,1/16",
                        help="fractions of the causal key blocks kept, e.g. 1/2,1/8")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-q", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=128)
    parser.add_argument("--lists", choices=("kv", "q"), default="kv",
                        help="one list per kv head (shared by its group) or per query head")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", help="comma-separated subset of implementations")
    parser.add_argument("--iters", type=int, default=12, help="timed samples per implementation")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    keeps = [eval_fraction(x) for x in args.keeps.split(",")]
    if args.quick:
        seq_lens, keeps = seq_lens[:1], [1 / 2, 1 / 8]
    impls = args.impls.split(",") if args.impls else None
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "dtype": args.dtype,
            "problem": f"B1 H{args.heads}/{args.kv_heads} D{args.head_dim} causal, block_q "
                       f"{args.block_q}, block_k {args.block_k}, lists per {args.lists} head"}
    print(meta, flush=True)
    all_results = {}
    for S in seq_lens:
        for keep in keeps:
            t0 = time.perf_counter()
            label = f"{S}/{keep:.4g}"
            all_results[label] = bench_problem(S, keep, args, impls)
            print(f"S={S} keep={keep:.4g}: done in {time.perf_counter() - t0:.0f}s", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "results": all_results}, f, indent=1)
    print(format_table(all_results))
    return all_results


def eval_fraction(text: str) -> float:
    """'1/8' -> 0.125, '0.5' -> 0.5."""
    num, _, den = text.partition("/")
    value = float(num) / (float(den) if den else 1.0)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a keep fraction must lie in (0, 1], got {text!r}")
    return value


if __name__ == "__main__":
    main()
