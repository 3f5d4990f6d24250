"""Which (query, key) pairs may attend: the one mask definition every
implementation of attention follows.

Positions: query i of a length-S query block sits at absolute position
``i + (T - S)`` against keys 0..T-1 (bottom-right alignment), so a decode step
with S=1 sees every key when causal.
"""
from __future__ import annotations

import jax.numpy as jnp


def visible(q_pos, k_pos, *, causal: bool, sliding_window: int | None,
            q_segment=None, k_segment=None):
    """Boolean mask of allowed pairs; arguments broadcast against each other.

    q_pos must already include the (T - S) offset. With a sliding window w,
    a key is visible when it lies fewer than w positions before the query
    (and, when not causal, fewer than w positions after it).
    """
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    if causal:
        ok &= k_pos <= q_pos
    if sliding_window is not None:
        ok &= q_pos - k_pos < sliding_window
        if not causal:
            ok &= k_pos - q_pos < sliding_window
    if q_segment is not None:
        ok &= q_segment == k_segment
    return ok
