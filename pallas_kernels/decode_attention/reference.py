"""Pure-jnp decode attention: the specification every kernel is tested against.

q [B, T, Hq, D] holds the T newest tokens of each sequence; lengths [B] int32
counts the tokens in the cache (those T included, already written). Query t
of sequence b sits at position lengths[b] - T + t and attends to the cache
positions at or before its own and, with a sliding window w, after its own
position - w. Hq is a multiple of Hkv: query head h reads kv head h // (Hq / Hkv).

Cache layouts (k and v alike):
  contiguous (page_table None): [B, S, Hkv, D]; capacity C = S;
  paged: a pool [P, page_size, Hkv, D] shared by all sequences and
  page_table [B, pages_per_seq] int32: logical block j of sequence b is page
  page_table[b, j] (entries are clamped to [0, P)); C = pages_per_seq * page_size.
Either may be a ``kv_formats.QuantizedKV`` (int8 or fp8 codes and per-token,
per-head scales) of the same leading layout; or k a Kivi2Keys and v a
Kivi2Values (KIVI-2 codes in the slots; the positions of the group still
filling, p >= L - L mod G, are read from the residual instead).

Ring rule (positions.py): position p lives in logical slot p % C, so slot s
holds p(s) = L-1 - ((L-1-s) mod C) and is valid iff p(s) >= 0; masking is by
p(s). A sequence (or query) that sees no slot gets zeros, and logsumexp -inf.

logits = scale * q.k (scale defaults to D**-0.5), then c*tanh(logits/c) with
logit_softcap c; softmax and the weighted sum in float32; the output has
q's dtype. Slots that no query sees get zero weight, and their values are
zeroed too, so stale contents (even non-finite ones) never reach the output.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.kv_formats import (KIVI_TYPES, QuantizedKV, dequantize_kv,
                                                        kivi2_dequantize)
from pallas_kernels.decode_attention.positions import query_position, slot_position, visible


def as_float32(x):
    """A cache tensor (an array or QuantizedKV) as float32 values."""
    if isinstance(x, QuantizedKV):
        return dequantize_kv(x, jnp.float32)
    return x.astype(jnp.float32)


def logical_cache(x, page_table):
    """[B, C, ...] logical view of a cache tensor: x itself when contiguous,
    else its pages gathered in page-table order (QuantizedKV leaf by leaf)."""
    if page_table is None:
        return x
    pages = jnp.clip(page_table, 0, jax.tree.leaves(x)[0].shape[0] - 1)

    def gather(leaf):
        g = leaf[pages]  # [B, pages_per_seq, page_size, ...]
        return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])
    return jax.tree.map(gather, x)


def cache_values(x, page_table, lengths):
    """[B, C, Hkv, D] float32: the values each logical slot holds, for a
    cache tensor of any format (KIVI-2: residual positions from the residual)."""
    if not isinstance(x, KIVI_TYPES):
        return as_float32(logical_cache(x, page_table))
    codes, scale, zero = logical_cache((x.codes, x.scale, x.zero), page_table)
    values = kivi2_dequantize(type(x)(codes, scale, zero, x.residual))
    B, C = values.shape[:2]
    L = jnp.maximum(lengths, 0)[:, None]
    pos = slot_position(L, jnp.arange(C, dtype=jnp.int32)[None], C)
    residual = x.residual.astype(jnp.float32)[jnp.arange(B)[:, None], jnp.mod(pos, x.group)]
    return jnp.where((pos >= L - L % x.group)[..., None, None], residual, values)


def decode_attention_reference_with_lse(q, k, v, lengths, *, page_table=None,
                                        sliding_window=None, logit_softcap=None, scale=None):
    """(out [B, T, Hq, D] in q.dtype, logsumexp [B, T, Hq] float32 of the
    scaled, capped logits; -inf where a query sees no slot)."""
    B, T, Hq, D = q.shape
    lengths = lengths.astype(jnp.int32)
    k = cache_values(k, page_table, lengths)
    v = cache_values(v, page_table, lengths)
    C, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    k_pos = slot_position(lengths[:, None], jnp.arange(C, dtype=jnp.int32)[None], C)  # [B, C]
    q_pos = query_position(lengths[:, None], jnp.arange(T, dtype=jnp.int32)[None], T)  # [B, T]
    mask = visible(q_pos[:, None, None, :, None], k_pos[:, None, None, None, :],
                   sliding_window)  # [B, 1, 1, T, C]
    qf = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, k) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    seen = jnp.any(mask, axis=(1, 2, 3))  # [B, C]: slots some query sees
    v = jnp.where(seen[:, :, None, None], v, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(denom == 0, 1.0, denom), v)
    lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + m_safe[..., 0], -jnp.inf)
    return (out.reshape(B, T, Hq, D).astype(q.dtype),
            lse.transpose(0, 3, 1, 2).reshape(B, T, Hq))


def decode_attention_reference(q, k, v, lengths, **kwargs):
    """The output of decode_attention_reference_with_lse."""
    return decode_attention_reference_with_lse(q, k, v, lengths, **kwargs)[0]


def decode_bytes(q, k, v, cached_tokens: int) -> int:
    """HBM bytes a decode step must move: q and the output once, and
    ``cached_tokens`` cache tokens (summed over the batch) of k and v, codes
    and scales included."""
    per_token = sum(leaf.dtype.itemsize * math.prod(leaf.shape[2:])
                    for leaf in jax.tree.leaves((k, v)))
    return int(2 * q.size * q.dtype.itemsize + cached_tokens * per_token)
