"""Block selection + block-sparse attention against dense causal flash
attention, one run, same device: the selection's cost counts in every time.

    python -m jaxkit.layers.sparse_attention.bench [--policy all] [--json PATH]

Per sequence length, policy and budget (--top-k: key blocks a query block
keeps; window_sinks keeps its window and sinks instead), the medians of
  select    the policy alone (pooled scores, top-k, lists);
  sparse    policy + block_sparse_attention, forward and forward+backward;
  dense     flash_attention(causal=True), forward and forward+backward;
and "x dense" = dense time / sparse time. Problem (defaults): B1, H32 query /
8 kv heads, D128, bf16, blocks of 64, window 64 + sinks 64, S = 16k..128k.
Sparse and dense run the same implementation name (--impl, as
model.attention.implementation; 'cudnn' times the dense side only against
the sparse 'pallas').

Off GPU everything runs interpreted or as the reference: ``--seq-lens 256
--heads 2 --kv-heads 1 --head-dim 32 --block-size 32 --top-k 2 --dtype
float32 --impl xla`` runs on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import jax
import jax.numpy as jnp

from jaxkit.config import SparseAttentionConfig
from jaxkit.layers.sparse_attention.attend import select_blocks, sparse_self_attention
from jaxkit.layers.sparse_attention.blocks import Layout
from pallas_kernels.attention import flash_attention
from pallas_kernels.benchmarking import time_fn

POLICIES = ("window_sinks", "infllm_v2", "proxy")
SEQ_LENS = (16384, 32768, 65536, 131072)


def _timed(f, q, k, v, do, iters):
    fwd = jax.jit(f)

    def loss(q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return {"fwd_ms": 1e3 * time_fn(fwd, q, k, v, iters=iters, warmup=1),
            "fwdbwd_ms": 1e3 * time_fn(fwdbwd, q, k, v, iters=iters, warmup=1)}


def problem_inputs(S, args):
    """q, k, v and the output cotangent of length S (the same for every
    policy: seeded by S)."""
    B, H, KH, D = 1, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    kq, kk, kv, kd = jax.random.split(jax.random.key(S), 4)
    q, do = (jax.random.normal(key, (B, S, H, D), jnp.float32).astype(dtype) for key in (kq, kd))
    k, v = (jax.random.normal(key, (B, S, KH, D), jnp.float32).astype(dtype) for key in (kk, kv))
    return q, k, v, do


def bench_dense(S, args) -> dict:
    """Dense causal flash attention at length S, timed once for all policies."""
    return {f"dense_{key}": t for key, t in _timed(
        lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=args.impl),
        *problem_inputs(S, args), args.iters).items()}


def bench_problem(S, cfg: SparseAttentionConfig, args) -> dict:
    q, k, v, do = problem_inputs(S, args)
    H = args.heads
    sparse_impl = "pallas" if args.impl == "cudnn" else args.impl
    select = jax.jit(lambda q, k: select_blocks(q, k, cfg))
    _, counts = select(q, k)
    causal = (Layout(S, S, cfg.block_size).last_causal() + 1).sum()
    result = {"kept": float(jnp.sum(counts)) * (H // counts.shape[1]) / (float(causal) * H),
              "select_ms": 1e3 * time_fn(select, q, k, iters=args.iters, warmup=1)}
    result |= {f"sparse_{key}": t for key, t in _timed(
        lambda q, k, v: sparse_self_attention(q, k, v, None, cfg, sparse_impl),
        q, k, v, do, args.iters).items()}
    return result


def configs(args):
    """(label, SparseAttentionConfig) of every policy and budget asked for."""
    base = SparseAttentionConfig(block_size=args.block_size, window=args.window, sinks=args.sinks)
    policies = POLICIES if args.policy == "all" else (args.policy,)
    for policy in policies:
        if policy == "window_sinks":
            yield policy, dataclasses.replace(base, policy=policy)
            continue
        for top_k in args.top_k:
            yield f"{policy}/k{top_k}", dataclasses.replace(base, policy=policy, top_k_blocks=top_k)


def format_table(results) -> str:
    lines = [f"{'S':>7s} {'policy':16s} {'kept':>6s} {'select ms':>9s} {'fwd ms':>9s} "
             f"{'x dense':>7s} {'f+b ms':>9s} {'x dense':>7s}"]
    for (S, label), r in results:
        lines.append(f"{S:>7d} {label:16s} {100 * r['kept']:5.1f}% {r['select_ms']:9.3f} "
                     f"{r['sparse_fwd_ms']:9.3f} {r['dense_fwd_ms'] / r['sparse_fwd_ms']:7.2f} "
                     f"{r['sparse_fwdbwd_ms']:9.3f} "
                     f"{r['dense_fwdbwd_ms'] / r['sparse_fwdbwd_ms']:7.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", choices=("all",) + POLICIES, default="all")
    p.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)))
    p.add_argument("--top-k", default="16,32,64", help="key blocks kept, e.g. 16,32")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impl", default="pallas",
                   choices=("auto", "xla", "pallas", "mosaic_gpu", "blockspec", "cudnn"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write the results here (after every problem)")
    args = p.parse_args(argv)
    args.top_k = [int(x) for x in args.top_k.split(",")]
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "args": vars(args)}
    print(meta, flush=True)
    results = []
    for S in (int(s) for s in args.seq_lens.split(",")):
        dense = bench_dense(S, args)
        for label, cfg in configs(args):
            results.append(((S, label), bench_problem(S, cfg, args) | dense))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "results": [
                        {"seq_len": S, "policy": lab, **r} for (S, lab), r in results]}, f,
                        indent=1)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
