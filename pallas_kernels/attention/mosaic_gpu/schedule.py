"""Which blocks each kernel visits and in what order: pure functions of the
problem, shared by the kernels and tested on CPU.

Block ranges cut the key (or query) blocks a tile sweeps to those the causal
or sliding-window mask lets it see, and tell which need no mask; segment
spans narrow them further for packed sequences. ``block_order`` and
``persistent_schedule`` decide which block runs which tile.
"""
from __future__ import annotations

import functools
import heapq

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.shapes import cdiv

SPAN_SEARCH = "sort"  # jnp.searchsorted method for the segment spans
WAVE_BLOCKS = 128  # about one block per multiprocessor of an H100 / H200 (132)
TILE_COST = 1  # a tile's fixed cost (Q load, output store) in pipeline steps, for scheduling


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_block_range(r0, rows, *, offset, q_len, kv_len, block_kv, causal, window):
    """Key blocks seen by query rows [r0, r0 + rows) of the padded query.

    Returns (lo, full_lo, full_hi, hi): blocks lo..hi-1 hold a visible key for
    some row; those in [full_lo, full_hi) are visible to every row (no mask).
    offset = T - S is the bottom-right shift of query positions.
    """
    del q_len  # rows past the real queries are sliced off: any range is fine
    zero = jnp.int32(0)
    first = r0 + offset             # position of the first row
    last = r0 + rows - 1 + offset   # and of the last
    key_lo, key_hi = zero, jnp.int32(kv_len)
    full_lo, full_hi = zero, jnp.int32(kv_len)
    if causal:
        key_hi = jnp.minimum(key_hi, last + 1)
        full_hi = jnp.minimum(full_hi, first + 1)
    if window is not None:
        key_lo = jnp.maximum(key_lo, first - window + 1)
        full_lo = jnp.maximum(full_lo, last - window + 1)
        if not causal:
            key_hi = jnp.minimum(key_hi, last + window)
            full_hi = jnp.minimum(full_hi, first + window)
    n = cdiv(jnp.int32(kv_len), block_kv)
    lo = _clip(lax.div(jnp.maximum(key_lo, 0), block_kv), 0, n)
    hi = _clip(cdiv(jnp.maximum(key_hi, 0), block_kv), lo, n)
    flo = _clip(cdiv(jnp.maximum(full_lo, 0), block_kv), lo, hi)
    fhi = _clip(lax.div(jnp.maximum(full_hi, 0), block_kv), flo, hi)
    return lo, flo, fhi, hi


def q_block_range(c0, cols, *, offset, q_len, kv_len, block_q, causal, window):
    """Query blocks that see keys [c0, c0 + cols): (lo, full_lo, full_hi, hi)
    as in ``kv_block_range``; rows past q_len are left out (their dO is 0)."""
    zero = jnp.int32(0)
    c_last = jnp.minimum(c0 + cols, kv_len) - 1   # last real key of the tile
    row_lo, row_hi = zero, jnp.int32(q_len)
    full_lo, full_hi = zero, jnp.int32(q_len)
    if causal:
        row_lo = jnp.maximum(row_lo, c0 - offset)
        full_lo = jnp.maximum(full_lo, c_last - offset)
    if window is not None:
        row_hi = jnp.minimum(row_hi, c_last + window - offset)
        full_hi = jnp.minimum(full_hi, c0 + window - offset)
        if not causal:
            row_lo = jnp.maximum(row_lo, c0 - window + 1 - offset)
            full_lo = jnp.maximum(full_lo, c_last - window + 1 - offset)
    # A tile holding padded keys always needs the mask; one of padding only is empty.
    full_hi = jnp.where(c0 + cols > kv_len, zero, full_hi)
    row_hi = jnp.where(c0 >= kv_len, zero, row_hi)
    n = cdiv(jnp.int32(q_len), block_q)
    lo = _clip(lax.div(jnp.maximum(row_lo, 0), block_q), 0, n)
    hi = _clip(cdiv(jnp.maximum(row_hi, 0), block_q), lo, n)
    flo = _clip(cdiv(jnp.maximum(full_lo, 0), block_q), lo, hi)
    fhi = _clip(lax.div(jnp.maximum(full_hi, 0), block_q), flo, hi)
    return lo, flo, fhi, hi


def segment_span(ids, other_ids):
    """Per position of ``ids`` [B,L]: the span [lo, hi) of ``other_ids``
    [B,M] holding the same segment id, when other_ids are sorted along M (packed
    sequences); all of [0, M) in rows where they are not. A superset of what
    the segments let a position see, so kernels may skip blocks outside it."""
    def search(side):  # 'sort': no XLA while loop (one per bit with 'scan')
        return jax.vmap(lambda a, v: jnp.searchsorted(a, v, side=side, method=SPAN_SEARCH))(
            other_ids, ids)
    m = other_ids.shape[1]
    is_sorted = jnp.all(other_ids[:, 1:] >= other_ids[:, :-1], axis=1, keepdims=True)
    return (jnp.where(is_sorted, search("left"), 0).astype(jnp.int32),
            jnp.where(is_sorted, search("right"), m).astype(jnp.int32))


def tile_spans(span, tile):
    """Per-position spans -> [2, B, L // tile]: the union span of each tile."""
    lo, hi = span
    B, L = lo.shape
    return jnp.stack([lo.reshape(B, L // tile, tile).min(-1),
                      hi.reshape(B, L // tile, tile).max(-1)])


def narrow(lo, hi, spans_ref, b, tile, block):
    """Block range [lo, hi) cut to the tile's segment span (positions) in spans_ref."""
    lo = jnp.maximum(lo, lax.div(spans_ref[0, b, tile], block))
    hi = jnp.minimum(hi, cdiv(spans_ref[1, b, tile], block))
    return lo, jnp.maximum(hi, lo)


def block_order(pairs, tiles):
    """Grid (and axis names) for ``pairs`` (batch, head) pairs of ``tiles`` tiles.

    CUDA starts blocks in grid order, each where an earlier one ended, and
    causal tiles differ in length up to ``tiles``-fold: so tile steps go
    outside the pairs (the kernels map step 0 to their longest tile), and the
    last blocks to start are short ones. Pairs go in groups that fill the GPU
    about once, so the blocks running together read few heads' K/V (which
    stay in L2)."""
    group = next(g for g in range(1, pairs + 1)
                 if pairs % g == 0 and (g * tiles >= WAVE_BLOCKS or g == pairs))
    return (pairs // group, tiles, group), ("group", "tile", "pair")


def block_position(heads, grid):
    """(batch, head, tile step) of this block under ``block_order``'s grid;
    pairs run head-fastest, so the heads of a kv group run together."""
    pair = lax.axis_index("group") * grid[2] + lax.axis_index("pair")
    return lax.div(pair, heads), lax.rem(pair, heads), lax.axis_index("tile")


@functools.lru_cache(maxsize=64)
def persistent_schedule(pairs, tiles, steps, n_sms):
    """Which tiles each block of a persistent kernel runs: int32 [blocks, 1 +
    most], a row per block (at most n_sms), its count of tiles and then their
    codes pair * tiles + tile, in order. Tiles go in ``block_order``'s order
    (groups of pairs, longest tiles first in a group; ``steps`` [tiles] are
    their lengths) each to the block whose estimated work ends first: what
    CUDA's block scheduler does with a grid of one block per tile."""
    grid, _ = block_order(pairs, tiles)
    by_length = sorted(range(tiles), key=lambda t: -steps[t])
    n = min(n_sms, pairs * tiles)
    ends = [(0, i) for i in range(n)]
    lists = [[] for _ in range(n)]
    for first in range(0, pairs, grid[2]):
        for t in by_length:
            for pair in range(first, first + grid[2]):
                end, i = heapq.heappop(ends)
                lists[i].append(pair * tiles + t)
                heapq.heappush(ends, (end + steps[t] + TILE_COST, i))
    table = np.zeros((n, 1 + max(map(len, lists))), np.int32)
    for i, codes in enumerate(lists):
        table[i, 0] = len(codes)
        table[i, 1:1 + len(codes)] = codes
    return table
