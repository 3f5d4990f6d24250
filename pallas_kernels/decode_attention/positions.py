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


def visible_blocks(lengths, capacity: int, num_queries: int, sliding_window: int | None,
                   block: int, lo, hi):
    """The blocks of ``block`` slots in [lo, hi) that hold a slot some query
    sees, as two ranges (first, end, first2, end2), either possibly empty.

    The visible positions are the newest ones, ages 0..A (age a: position
    L-1-a) with A = min(L-1, C-1, T-1 + w-1), so their slots run backwards
    around the ring from the newest slot (L-1) mod C: one interval, or two
    where they wrap past slot 0. Scalar int32 math, as kernels compute it."""
    lengths = jnp.maximum(lengths, 0)
    n_blocks = -(-capacity // block)
    oldest = jnp.minimum(lengths - 1, capacity - 1)
    if sliding_window is not None:
        oldest = jnp.minimum(oldest, num_queries + sliding_window - 2)
    newest = lax.rem(lengths - 1 + capacity, capacity)
    first = newest - oldest  # the oldest visible slot, or that minus C where it wraps
    wraps = first < 0
    end = lax.div(newest, block) + 1
    start = jnp.where(wraps, 0, lax.div(jnp.maximum(first, 0), block))
    start2 = jnp.where(wraps, lax.div(first + capacity, block), n_blocks)
    # Ranges that meet (the gap between them is inside a block) are all blocks.
    end = jnp.where(wraps & (start2 < end), n_blocks, end)
    start2 = jnp.maximum(start2, end)
    none = oldest < 0

    def clip(a, b):
        a = jnp.clip(a, lo, hi)
        return a, jnp.where(none, a, jnp.clip(b, a, hi))
    return (*clip(start, end), *clip(start2, jnp.int32(n_blocks)))
