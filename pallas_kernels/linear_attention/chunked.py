"""Chunked gated linear attention in jnp (implementation='xla'), differentiated
by XLA. The same chunk math as the Pallas kernel (see
docs/design/linear-attention.md):

  b        cumulative log decay within each chunk of C tokens (b <= 0 when
           every log decay is);
  states   h_{n+1} = diag(exp(b_last)) h_n + (k * exp(b_last - b))^T v,
           one sequential step per chunk;
  outputs  o = scale * ((q * exp(b)) h_n + (q k^T masked by exp(b_t - b_s),
           s <= t) v).

Every exponent is <= 0, so nothing overflows however fast the decay. With
a per-key decay the masked intra-chunk scores need the decay per key
dimension; they are split into sub-blocks of SUB tokens: across sub-blocks
a reference point between the two factors keeps both exponents <= 0, and
the SUB x SUB diagonal blocks are computed element by element.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.shapes import pad_axis_to_multiple

SUB = 16  # sub-block of the per-key intra-chunk scores


def causal_exponent(b_rows, b_cols):
    """exp(b_t - b_s) for s <= t, 0 above the diagonal; the exponent is masked
    before exp so that neither the value nor its gradient overflows."""
    t = lax.broadcasted_iota(jnp.int32, (b_rows.shape[-1], b_cols.shape[-1]), 0)
    s = lax.broadcasted_iota(jnp.int32, (b_rows.shape[-1], b_cols.shape[-1]), 1)
    diff = b_rows[..., :, None] - b_cols[..., None, :]
    return jnp.exp(jnp.where(s <= t, diff, -jnp.inf))


def _scalar_scores(q, k, b):
    """Masked decayed scores [..., C, C] of a per-head decay b [..., C]."""
    return jnp.einsum("...tk,...sk->...ts", q, k) * causal_exponent(b, b)


def _per_key_scores(q, k, b):
    """Masked decayed scores [..., C, C] of a per-key decay b [..., C, Dk]."""
    *lead, C, Dk = q.shape
    n, c = C // SUB, SUB
    qs, ks, bs = (x.reshape(*lead, n, c, Dk) for x in (q, k, b))
    # r_i: b just before sub-block i (0 before the first): b_t - r_i <= 0 for
    # t in block i and r_i - b_s <= 0 for s in an earlier block.
    r = jnp.concatenate([jnp.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], axis=-2)
    q_ref = qs * jnp.exp(bs - r[..., :, None, :])
    i = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    j = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    earlier = (j < i)[:, :, None, None]
    # [..., i, j, c, Dk]: block j's keys decayed to r_i (zero unless j < i).
    exponent = r[..., :, None, None, :] - bs[..., None, :, :, :]
    k_ref = ks[..., None, :, :, :] * jnp.exp(jnp.where(earlier, exponent, -jnp.inf))
    across = jnp.einsum("...itk,...ijsk->...itjs", q_ref, k_ref)
    # Diagonal blocks: exp(b_t - b_s) per key dimension, [..., n, c, c, Dk].
    t = lax.broadcasted_iota(jnp.int32, (c, c), 0)[..., None]
    s = lax.broadcasted_iota(jnp.int32, (c, c), 1)[..., None]
    diff = bs[..., :, None, :] - bs[..., None, :, :]
    within = jnp.einsum("...tk,...sk,...tsk->...ts", qs, ks,
                        jnp.exp(jnp.where(s <= t, diff, -jnp.inf)))
    same = (i == j)[:, None, :, None]
    scores = jnp.where(same, within[..., :, :, None, :], across)
    return scores.reshape(*lead, C, C)


def chunk_states(k, v, b, initial_state):
    """States entering each chunk and the final state.

    k [B,H,N,C,Dk], v [B,H,N,C,Dv], b [B,H,N,C,Dk] (within-chunk cumulative
    log decay), initial_state [B,H,Dk,Dv] -> (h [B,H,N,Dk,Dv], final)."""
    b_last = b[..., -1, :]
    local = jnp.einsum("bhnck,bhncv->bhnkv", k * jnp.exp(b_last[..., None, :] - b), v)

    def step(h, xs):
        decay, update = xs
        return jnp.exp(decay)[..., None] * h + update, h

    final, h = lax.scan(step, initial_state, (jnp.moveaxis(b_last, 2, 0),
                                              jnp.moveaxis(local, 2, 0)))
    return jnp.moveaxis(h, 0, 2), final


def xla_linear_attention(q, k, v, log_decay, initial_state, *, scale, chunk):
    """Chunked gated linear attention; arguments checked as api.linear_attention
    does. -> (out [B,S,H,Dv] in q.dtype, final state [B,H,Dk,Dv] float32)."""
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    scalar = log_decay.ndim == 3
    g = log_decay.astype(jnp.float32)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, Dk, Dv), jnp.float32)

    def chunks(x):  # [B, S, H, ...] -> [B, H, N, C, ...], zero-padded to whole chunks
        x = pad_axis_to_multiple(x.astype(jnp.float32), 1, chunk)
        x = x.reshape(B, -1, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    b = jnp.cumsum(chunks(g), axis=3)  # padded tokens decay by exp(0): the state is kept
    b_keys = b[..., None] if scalar else b
    h, final = chunk_states(kc, vc, jnp.broadcast_to(b_keys, kc.shape),
                            initial_state.astype(jnp.float32))
    scores = _scalar_scores(qc, kc, b) if scalar else _per_key_scores(qc, kc, b)
    out = jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(b_keys), h)
    out = scale * (out + jnp.einsum("bhnts,bhnsv->bhntv", scores, vc))
    out = jnp.moveaxis(out, 1, 3).reshape(B, -1, H, Dv)[:, :S]
    return out.astype(q.dtype), final

