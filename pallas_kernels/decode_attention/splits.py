"""Flash-decoding's bookkeeping, shared by the kernels: the query rows a kv
head's program owns, how many splits the cache length is cut into, and the
merge of the splits' partial results.

Rows: a program owns kv head h of sequence b and every query that reads it,
the group's G query heads times the T new tokens, as rows r = t * G + g
(query head h * G + g of token t). It walks its split of the cache once for
all of them, so each KV tile is read once per group.

Each split writes its partial output, normalised by its own softmax sum, and
the logsumexp of its logits (-inf where it saw nothing); ``merge`` weighs the
partials by exp(lse - max lse).
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.shapes import cdiv, pad_to

# A split count is kept when its blocks fill the GPU's waves within this
# fraction of the best count's: fewer splits mean less merging and longer,
# better-pipelined walks.
WAVE_SLACK = 0.05
MAX_SPLITS = 64


def query_rows(q, kv_heads: int, rows: int):
    """q [B, T, Hq, D] -> [B, Hkv, rows, D]: row t * G + g is query head
    h * G + g of token t; rows past T * G are zero."""
    B, T, Hq, D = q.shape
    G = Hq // kv_heads
    r = q.reshape(B, T, kv_heads, G, D)
    if T > 1:  # at T = 1 the rows are q's own order: a reshape, no copy
        r = r.transpose(0, 2, 1, 3, 4)
    r = r.reshape(B, kv_heads, T * G, D)
    return pad_to(r, (B, kv_heads, rows, D))


def from_query_rows(rows, num_queries: int, q_heads: int):
    """The inverse of query_rows, its padding rows already dropped:
    [B, Hkv, T * G, D] -> [B, T, Hq, D]."""
    B, kv_heads, _, D = rows.shape
    G = q_heads // kv_heads
    r = rows.reshape(B, kv_heads, num_queries, G, D)
    return r.transpose(0, 2, 1, 3, 4).reshape(B, num_queries, q_heads, D)


def merge(out, lse):
    """out [..., parts, R, D] float32 (each part normalised, zero where it
    saw nothing), lse [..., parts, R] natural-log logsumexp (-inf: nothing)
    -> [..., R, D] float32, zero for rows that no part saw."""
    top = jnp.max(lse, axis=-2, keepdims=True)
    weight = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weight, axis=-2)
    merged = jnp.sum(weight[..., None] * out, axis=-3)
    return merged / jnp.where(total == 0, 1.0, total)[..., None]


def merge_query_rows(out, lse, num_queries: int, q_heads: int, dtype):
    """A kernel's partials out [B, Hkv, parts, rows, D] and logsumexps
    [B, Hkv, parts, >= rows] -> [B, T, Hq, D] in ``dtype``. The padding rows
    are sliced off before the merge, so it reads and weighs only the real ones."""
    real = num_queries * (q_heads // out.shape[1])
    merged = merge(out[..., :real, :], lse[..., :real])
    return from_query_rows(merged, num_queries, q_heads).astype(dtype)


def default_splits(programs: int, blocks: int, sm_count: int) -> int:
    """Splits of each (sequence, kv head) pair's ``blocks`` cache blocks for
    ``programs`` pairs: the fewest whose programs fill the GPU's waves within
    WAVE_SLACK of the best count (at most one split per block, MAX_SPLITS)."""
    def filled(splits):
        n = programs * splits
        return n / (cdiv(n, sm_count) * sm_count)
    candidates = range(1, max(1, min(blocks, MAX_SPLITS)) + 1)
    best = max(filled(s) for s in candidates)
    return next(s for s in candidates if filled(s) >= best - WAVE_SLACK)
