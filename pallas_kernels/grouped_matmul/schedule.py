"""Tile schedule shared by the grouped-matmul kernels.

Rows are cut into row tiles of tm rows. A *step* is one (group, row tile)
pair where the group owns rows of the tile; a tile shared by two groups gets
one step per group. Steps are ordered by group, so steps that touch the same
row tile (gmm) or the same group (tgmm) are consecutive. The step count is
data dependent but bounded by ``cdiv(M, tm) + groups - 1``: kernels run that
static number of steps and the unused tail repeats the last real step with
no rows (lo == hi), so it writes nothing new and fetches no new blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.shapes import cdiv


class Schedule(NamedTuple):
    """int32 arrays, one entry per step."""
    group: jnp.ndarray  # group of the step (== G for gmm's zero tail)
    tile: jnp.ndarray   # row-tile index
    lo: jnp.ndarray     # first row of the step (absolute)
    hi: jnp.ndarray     # one past its last row; lo == hi: no rows
    first: jnp.ndarray  # 1 on the first step of its output block


def num_steps(m: int, tm: int, groups: int) -> int:
    return cdiv(m, tm) + groups - 1


def make_schedule(group_sizes, m: int, tm: int, *, zero_tail: bool) -> Schedule:
    """Schedule for ``m`` rows in tiles of ``tm``.

    zero_tail=True (gmm): rows past sum(group_sizes) form an extra group G
    whose output is zero, and empty groups get no step; a step is ``first``
    when it is the first on its row tile. zero_tail=False (tgmm): every
    group, empty ones included, gets at least one step (so its output block
    is written), and a step is ``first`` when it is the first of its group.
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    if zero_tail:
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    nonempty = ends > starts
    n_tiles = cdiv(m, tm)
    first_tile = jnp.minimum(starts // tm, n_tiles - 1)
    last_tile = jnp.maximum(ends - 1, 0) // tm
    steps_per_group = jnp.where(nonempty, last_tile - first_tile + 1, 0 if zero_tail else 1)
    step_ends = jnp.cumsum(steps_per_group)
    total = step_ends[-1]

    s = jnp.minimum(jnp.arange(num_steps(m, tm, starts.shape[0]), dtype=jnp.int32), total - 1)
    group = jnp.searchsorted(step_ends, s, side="right").astype(jnp.int32)
    within = s - (step_ends[group] - steps_per_group[group])
    tile = first_tile[group] + within
    real = jnp.arange(s.shape[0]) < total
    lo = jnp.maximum(starts[group], tile * tm)
    hi = jnp.where(real & nonempty[group], jnp.minimum(ends[group], (tile + 1) * tm), lo)
    if zero_tail:
        first = (s == 0) | (tile != jnp.roll(tile, 1))
    else:
        first = within == 0
    first = first & real
    return Schedule(group, tile, lo, hi, first.astype(jnp.int32))


def snake_index(i, block, blocks: int):
    """The work-list index of a persistent block's i-th item when the list is
    dealt in rounds of ``blocks`` items, forwards in even rounds and
    backwards in odd ones: sorted by decreasing work, every block's items
    then sum to nearly the same work."""
    return i * blocks + jnp.where(i % 2 == 0, block, blocks - 1 - block)


def snake_count(items: int, block, blocks: int):
    """How many of ``items`` snake_index deals to ``block``: every round but
    the last is full, and the last may not reach it."""
    rounds = cdiv(items, blocks)
    return rounds - 1 + (snake_index(rounds - 1, block, blocks) < items).astype(jnp.int32)
