"""Pure-jnp gated linear attention: the specification every implementation is
tested against, as the token-by-token recurrence, in float32.

Layout: q, k [batch, len, heads, key_dim]; v [batch, len, heads, value_dim];
log_decay [batch, len, heads] (one decay per head, GLA's scalar form) or
[batch, len, heads, key_dim] (one per key dimension); state [batch, heads,
key_dim, value_dim]. For each token t:

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

S_0 is the initial state (zeros when none is given); the result is every
o_t and the final state S_len.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def per_key_decay(log_decay, key_dim: int):
    """log_decay as [B, S, H, key_dim] float32 (a per-head decay repeated)."""
    g = log_decay.astype(jnp.float32)
    if g.ndim == 3:
        g = jnp.broadcast_to(g[..., None], (*g.shape, key_dim))
    return g


def linear_attention_reference(q, k, v, log_decay, initial_state=None, *, scale=None):
    """-> (out [B,S,H,Dv] in q.dtype, final state [B,H,Dk,Dv] float32)."""
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    state = (jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    time_major = [jnp.moveaxis(x.astype(jnp.float32), 1, 0)
                  for x in (q, k, v, per_key_decay(log_decay, Dk))]

    def step(state, xs):
        q_t, k_t, v_t, g_t = xs  # [B, H, D]
        state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)

    state, out = lax.scan(step, state, time_major)
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


def linear_attention_flops(batch, length, heads, key_dim, value_dim, *, chunk,
                           with_backward=False):
    """Matmul FLOPs of the chunked form: per chunk of C tokens the C x C
    scores and their product with v (intra-chunk), q times the state
    (inter-chunk) and the state update; backward counted as 2x forward."""
    per_token = 2 * (chunk * key_dim + chunk * value_dim + 2 * key_dim * value_dim)
    f = float(batch * heads * length * per_token)
    return f * (3.0 if with_backward else 1.0)
