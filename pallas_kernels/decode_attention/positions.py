"""Which cache slot holds which position, and which slots a query sees: the
one definition every implementation of decode attention follows.

A sequence of length L (tokens written so far, the T new ones included) keeps
position p in logical slot p % C of a cache of C slots (a ring, so a
sliding-window layer keeps only its window). Slot s therefore holds

    p(s) = L - 1 - ((L - 1 - s) mod C),

the newest position that maps to it, and is valid iff p(s) >= 0. While
L <= C this is p(s) = s. Query t of the T new ones sits at position
L - T + t and sees the valid slots with p(s) <= its position and, with a
sliding window w, p(s) > its position - w. Negative lengths count as 0.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def slot_position(lengths, slots, capacity: int):
    """p(s) for int32 ``lengths`` and ``slots`` (broadcasting, slots in
    [0, capacity)); negative where the slot holds no position. The remainder
    is of a non-negative number (lax.rem, as kernels compute it)."""
    lengths = jnp.maximum(lengths, 0)
    return lengths - 1 - lax.rem(lengths - 1 - slots + capacity, capacity)


def query_position(lengths, t, num_queries: int):
    """Position of query t of the ``num_queries`` newest tokens."""
    return jnp.maximum(lengths, 0) - num_queries + t


def visible(q_pos, k_pos, sliding_window: int | None):
    """Slots a query sees: valid, not after it, inside its window."""
    ok = (k_pos >= 0) & (k_pos <= q_pos)
    if sliding_window is not None:
        ok &= k_pos > q_pos - sliding_window
    return ok
