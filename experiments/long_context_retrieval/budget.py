"""What a sparse-attention config keeps, from the shapes alone: the fraction
of the causal key blocks its lists hold (per query head, so kv-head lists
count once per head they serve) and the matmul FLOPs of the selection's pooled
scoring against those of the attention it steers. All three policies' counts
depend on the shapes only (top-k and the proxy group budgets are fixed
numbers), so random q and k give the exact figures."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkit.config import ModelConfig
from jaxkit.layers.sparse_attention import select_blocks
from jaxkit.layers.sparse_attention.attend import runs_dense
from jaxkit.layers.sparse_attention.blocks import Layout


def kept_fraction(model: ModelConfig, seq_len: int) -> float:
    """Kept / causal key blocks of one sparse layer at seq_len (1.0: dense)."""
    sp = model.attention.sparse
    if sp.policy == "none" or runs_dense(sp, seq_len):
        return 1.0
    Hq, Hkv, D = model.num_heads, model.kv_heads, model.dim_per_head
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, seq_len, Hq, D))
    k = jax.random.normal(kk, (1, seq_len, Hkv, D))
    _, counts = jax.jit(lambda q, k: select_blocks(q, k, sp))(q, k)
    causal = Layout(seq_len, seq_len, sp.block_size).last_causal() + 1
    per_head = Hq // counts.shape[1]
    return float(jnp.sum(counts)) * per_head / (float(causal.sum()) * Hq)


def selection_flops_ratio(model: ModelConfig, seq_len: int) -> float:
    """Pooled-score FLOPs (2 Hq nQ nK D) over the dense causal attention
    forward's (4 Hq D x the causal query-key pairs, about S^2 / 2)."""
    sp = model.attention.sparse
    if sp.policy in ("none", "window_sinks") or runs_dense(sp, seq_len):
        return 0.0
    n = -(-seq_len // sp.block_size)
    pairs = seq_len * (seq_len + 1) / 2
    return (2.0 * n * n) / (4.0 * pairs)


def attention_speedup_bound(model: ModelConfig, seq_len: int) -> float:
    """Dense attention FLOPs over (kept attention + selection) FLOPs: the
    speed-up a kernel at equal efficiency would give; measured times come from
    python -m jaxkit.layers.sparse_attention.bench."""
    return 1.0 / (kept_fraction(model, seq_len) + selection_flops_ratio(model, seq_len))


def describe(model: ModelConfig) -> str:
    sp = model.attention.sparse
    if sp.policy == "none":
        return "dense"
    parts = [sp.policy, f"block {sp.block_size}", f"window {sp.window}", f"sinks {sp.sinks}"]
    if sp.policy != "window_sinks":
        parts.append(f"top-k {sp.top_k_blocks}")
    return ", ".join(parts)

