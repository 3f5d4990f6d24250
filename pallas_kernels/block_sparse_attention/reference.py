"""Pure-jnp block-sparse attention: the specification every kernel is tested
against.

Layout as flash_attention's: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], Hkv
dividing Hq (query head h reads kv head h // (Hq / Hkv)). Query block i holds
rows [i*block_q, (i+1)*block_q), key block j keys [j*block_k, (j+1)*block_k)
(the last blocks may be partial). Query row s sees key t when t's block is in
the list of s's block (``lists.block_mask``) and the attention mask allows the
pair (``attention.mask.visible``: causal with bottom-right alignment, segment
ids). Softmax and the weighted sum in float32; rows that see no key give 0.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.attention.mask import visible
from pallas_kernels.block_sparse_attention.lists import block_mask
from pallas_kernels.shapes import cdiv


def token_mask(block_indices, block_counts, *, q_len, kv_len, heads, block_q, block_k,
               causal=False, segment_ids=None):
    """bool [B, heads, q_len, kv_len]: the pairs that may attend. Lists per kv
    head (H < heads) hold for each query head of the group."""
    blocks = block_mask(block_indices, block_counts, cdiv(kv_len, block_k))
    blocks = jnp.repeat(blocks, heads // blocks.shape[1], axis=1)
    rows = jnp.arange(q_len) // block_q
    cols = jnp.arange(kv_len) // block_k
    listed = blocks[:, :, rows][:, :, :, cols]
    seg = {}
    if segment_ids is not None:
        seg = dict(q_segment=segment_ids[0][:, None, :, None],
                   k_segment=segment_ids[1][:, None, None, :])
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    return listed & visible(q_pos, jnp.arange(kv_len)[None, :], causal=causal,
                            sliding_window=None, **seg)


def block_sparse_attention_reference(q, k, v, block_indices, block_counts, *, block_q, block_k,
                                     causal=False, segment_ids=None, softmax_scale=None):
    """out [B, Sq, Hq, D] in q.dtype. segment_ids: None or a pair (q ids
    [B, Sq], kv ids [B, Sk])."""
    B, S, H, D = q.shape
    T, KH = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    mask = token_mask(block_indices, block_counts, q_len=S, kv_len=T, heads=H,
                      block_q=block_q, block_k=block_k, causal=causal, segment_ids=segment_ids)
    kf = jnp.repeat(k.astype(jnp.float32), H // KH, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), H // KH, axis=2)
    logits = jnp.einsum("bshd,bthd->bhst", q.astype(jnp.float32), kf) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total == 0, 1.0, total)  # rows that see nothing: 0
    return jnp.einsum("bhst,bthd->bshd", weights, vf).astype(q.dtype)
