"""Block-selection policies: pure functions of a layer's q [B, S, Hq, D] and
k [B, S, Hkv, D] (after rotary embedding) giving the lists of
pallas_kernels.block_sparse_attention: block_indices int32 [B, H, nQ, M] and
block_counts int32 [B, H, nQ], rows sorted ascending with nK past the count.
All are causal (no list names a key block after its query block's last
position), jit-compatible (M is static: a function of the shapes and the
policy's integers) and give no gradient to q or k. The exact rules and their
costs: docs/design/block-selection.md.

    window_sinks  the sliding window and the sink blocks; lists per kv head.
    infllm_v2     top-k key blocks by pooled q.k, per kv-head group, always
                  with the window and sinks; dense below a length threshold.
    proxy         one ranking per group from proxy heads, a group budget
                  apportioned to its query heads by how many ranked blocks
                  each needs to cover its own score mass; lists per query head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkit.layers.sparse_attention.blocks import (Layout, dense_lists, forced_count,
                                                   pooled_logits, sorted_lists)

# A proxy-policy head may take up to this many times the average per-head budget.
PROXY_HEAD_CAP = 2


def _layout(q, k, block_size: int) -> Layout:
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"q [B, Sq, Hq, D] and k [B, Sk, Hkv, D] with Hkv dividing Hq "
                         f"expected, got {q.shape} and {k.shape}")
    return Layout(q.shape[1], k.shape[1], block_size)


def _check_budget(layout: Layout, top_k_blocks: int, window: int, sinks: int) -> None:
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0 tokens, got {window}, {sinks}")
    forced = forced_count(layout, window, sinks)
    if top_k_blocks < forced:
        raise ValueError(f"top_k_blocks ({top_k_blocks}) must cover the {forced} window and "
                         f"sink blocks (window {window}, sinks {sinks}, block {layout.block_size})")


def window_sinks(q, k, *, block_size: int, window: int, sinks: int):
    """Query block i keeps the window blocks last_i - w + 1 .. last_i
    (w = ceil(window / bs), last_i its last causal block) and the sink blocks
    0 .. ceil(sinks / bs) - 1 that are causal. Lists per kv head (identical)."""
    layout = _layout(q, k, block_size)
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0 tokens, got {window}, {sinks}")
    w, s = layout.blocks(window), layout.blocks(sinks)
    nK = layout.num_kv_blocks
    last = jnp.asarray(layout.last_causal())[:, None]
    sink = jnp.broadcast_to(jnp.arange(s), (layout.num_q_blocks, s))
    near = last - jnp.arange(w)[::-1]
    # a window block below the sinks is one of them, or negative
    keep = jnp.concatenate([sink <= last, near >= s], axis=-1)
    rows = jnp.sort(jnp.where(keep, jnp.concatenate([sink, near], axis=-1), nK), axis=-1)
    rows = rows[:, :min(s + w, nK)].astype(jnp.int32)
    shape = (q.shape[0], k.shape[2], layout.num_q_blocks)
    return (jnp.broadcast_to(rows, shape + rows.shape[-1:]),
            jnp.broadcast_to(jnp.sum(keep, axis=-1, dtype=jnp.int32), shape))


def _ranked_scores(scores, causal, forced):
    """scores [..., nQ, nK] with the forced blocks at +inf and the non-causal
    ones at -inf, so a descending order lists forced, then scored, blocks."""
    return jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))


def infllm_v2(q, k, *, block_size: int, top_k_blocks: int, window: int, sinks: int,
              dense_below: int = 0, group_score: str = "max"):
    """Lists per kv head. When Sk <= dense_below, every causal block (a
    static choice). Else query block i of kv group g keeps the
    min(top_k_blocks, last_i + 1) causal key blocks of highest score, the
    window and sink blocks first: score_ij = max (or mean: group_score) over
    the group's query heads of mean(q block i) . mean(k block j) / sqrt(D)."""
    layout = _layout(q, k, block_size)
    if k.shape[1] <= dense_below:
        return dense_lists(layout, q.shape[0], k.shape[2])
    _check_budget(layout, top_k_blocks, window, sinks)
    if group_score not in ("max", "mean"):
        raise ValueError(f"group_score must be 'max' or 'mean', got {group_score!r}")
    logits = pooled_logits(q, k, block_size)
    scores = jnp.max(logits, axis=2) if group_score == "max" else jnp.mean(logits, axis=2)
    keep = min(top_k_blocks, layout.num_kv_blocks)
    ranked = _ranked_scores(scores, *layout.causal_and_forced(window, sinks))
    _, indices = jax.lax.top_k(ranked, keep)
    counts = jnp.minimum(keep, jnp.asarray(layout.last_causal() + 1, jnp.int32))
    return sorted_lists(indices, jnp.broadcast_to(counts, indices.shape[:-1]),
                        layout.num_kv_blocks)


def coverage_demand(logits, order, counts_cap, coverage: float):
    """int32 [..., nQ]: per head, how many blocks of the group ranking
    ``order`` [..., nQ, M] (broadcast over the head axis) it takes for the
    head's softmax over its causal block logits [..., nQ, nK] (-inf where not
    causal) to reach ``coverage``; at most counts_cap [nQ]."""
    probs = jax.nn.softmax(logits, axis=-1)
    along = jnp.take_along_axis(probs, jnp.broadcast_to(order, probs.shape[:-1] + order.shape[-1:]),
                                axis=-1)
    short = jnp.sum(jnp.cumsum(along, axis=-1) < coverage, axis=-1, dtype=jnp.int32)
    return jnp.minimum(short + 1, counts_cap)


def apportion(demand, *, total, floor, cap, slots: int):
    """Sainte-Lague (Webster) apportionment of ``total`` [nQ] blocks among a
    group's heads (axis -2 of demand [..., G, nQ], demand >= 1) in proportion
    to demand: head g's n-th block has priority demand_g / (n - 1/2) (n <=
    floor: first, n > cap: never; floor <= total / G <= cap <= slots, all [nQ]
    but slots), and the ``total`` highest priorities win, ties to the lower
    head. The divisor method with the least bias between large and small
    shares. Returns int32 [..., G, nQ], each head in [floor, cap], summing to
    total over G."""
    G = demand.shape[-2]
    n = jnp.arange(1, slots + 1)
    priority = demand[..., None].astype(jnp.float32) / (n - 0.5)  # [..., G, nQ, slots]
    priority = jnp.where(n <= floor[:, None], jnp.inf,
                         jnp.where(n <= cap[:, None], priority, -jnp.inf))
    flat = jnp.swapaxes(priority, -3, -2).reshape(*priority.shape[:-3], -1, G * slots)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    won = jnp.argsort(order, axis=-1) < total[:, None]  # rank among the group's slots
    won = won.reshape(*priority.shape[:-3], -1, G, slots)
    return jnp.swapaxes(jnp.sum(won, axis=-1, dtype=jnp.int32), -1, -2)


def proxy(q, k, *, block_size: int, top_k_blocks: int, window: int, sinks: int,
          coverage: float = 0.9, proxy_heads: int = 0, dense_below: int = 0):
    """Lists per query head. When Sk <= dense_below, every causal block.
    Else, per kv group and query block i:
      ranking: causal key blocks by the proxy score (the group's first
        proxy_heads query heads, 0: all of them, averaged: mean over those
        heads of mean(q block) . mean(k block) / sqrt(D)), the window and sink
        blocks first; a head keeps a prefix of it;
      demand of head h: the shortest prefix of the ranking holding
        ``coverage`` of h's own softmax over its pooled block logits;
      budget: T_i = G * min(top_k_blocks, C_i) blocks for the group, C_i =
        min(PROXY_HEAD_CAP * top_k_blocks, nK, last_i + 1) the most one head
        may keep, apportioned to the heads by ``apportion`` (Sainte-Lague, in
        proportion to demand, each head between its forced blocks and C_i).
    A head whose mass spreads over many blocks takes more of the group's
    budget from one whose mass sits in a few."""
    layout = _layout(q, k, block_size)
    B, Hq, Hkv = q.shape[0], q.shape[2], k.shape[2]
    if k.shape[1] <= dense_below:
        return dense_lists(layout, B, Hq)
    _check_budget(layout, top_k_blocks, window, sinks)
    G = Hq // Hkv
    if not 0 <= proxy_heads <= G:
        raise ValueError(f"proxy_heads must lie in [0, {G}] (query heads per kv head), "
                         f"got {proxy_heads}")
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    causal, forced = layout.causal_and_forced(window, sinks)
    logits = jnp.where(causal, pooled_logits(q, k, block_size), -jnp.inf)
    proxy_logits = jnp.mean(logits[:, :, :proxy_heads or G], axis=2)
    M = min(PROXY_HEAD_CAP * top_k_blocks, layout.num_kv_blocks)
    _, order = jax.lax.top_k(_ranked_scores(proxy_logits, causal, forced), M)
    causal_blocks = jnp.asarray(layout.last_causal() + 1, jnp.int32)
    cap = jnp.minimum(M, causal_blocks)
    floor = jnp.sum(forced, axis=-1, dtype=jnp.int32)
    demand = coverage_demand(logits, order[:, :, None], cap, coverage)
    counts = apportion(jnp.maximum(demand, floor), total=G * jnp.minimum(top_k_blocks, cap),
                       floor=floor, cap=cap, slots=M)
    indices = jnp.broadcast_to(order[:, :, None], (B, Hkv, G) + order.shape[2:])
    return sorted_lists(indices.reshape(B, Hq, *order.shape[2:]), counts.reshape(B, Hq, -1),
                        layout.num_kv_blocks)
