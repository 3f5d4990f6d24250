"""Pure-jnp attention: the specification every kernel is tested against.

Layout: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim]
with kv_heads dividing heads (grouped-query attention). Computed in float32.
Rows with no visible key return zeros (and logsumexp -inf), never NaN.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.attention.mask import visible


def attention_reference_with_lse(q, k, v, *, causal=False, segment_ids=None,
                                 sliding_window=None, logit_softcap=None, scale=None):
    """Returns (out [B,S,H,D] in q.dtype, logsumexp [B,H,S] float32)."""
    B, S, H, D = q.shape
    T, KH = k.shape[1], k.shape[2]
    G = H // KH
    scale = D ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(B, S, KH, G, D)
    logits = jnp.einsum("bskgd,btkd->bkgst", qf, k.astype(jnp.float32)) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    q_pos = jnp.arange(S)[:, None] + (T - S)
    k_pos = jnp.arange(T)[None, :]
    q_seg = k_seg = None
    if segment_ids is not None:
        q_seg_ids, kv_seg_ids = segment_ids
        q_seg, k_seg = q_seg_ids[:, None, None, :, None], kv_seg_ids[:, None, None, None, :]
    mask = visible(q_pos, k_pos, causal=causal, sliding_window=sliding_window,
                   q_segment=q_seg, k_segment=k_seg)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgst,btkd->bskgd", p / jnp.where(denom == 0, 1.0, denom),
                     v.astype(jnp.float32))
    lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + m_safe[..., 0], -jnp.inf)
    return out.reshape(B, S, H, D).astype(q.dtype), lse.reshape(B, H, S)


def attention_reference(q, k, v, **kwargs):
    return attention_reference_with_lse(q, k, v, **kwargs)[0]


def attention_flops(batch, q_len, kv_len, heads, head_dim, *, causal, with_backward=False):
    """Matmul FLOPs of attention (4*B*H*S*T*D forward; halved when causal and
    S == T); with_backward adds the backward pass (2.5x forward), the
    convention FlashAttention papers use."""
    f = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        f /= 2
    return f * (3.5 if with_backward else 1.0)

