"""Block lists: the canonical form every kernel reads, the transposed lists
of the backward pass and the dense block mask of the reference.

A list row (b, h, i) names the key blocks (units of block_k) that query block
i of head h visits: ``indices[b, h, i, :counts[b, h, i]]``. The canonical
form sorts each row's listed blocks ascending, drops repeats and indices
outside [0, nK), and puts them first; its entries past the count hold nK.
Sorted rows read K and V in address order and put the blocks that a causal
mask cuts at the end of each row (``unmasked_prefix``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def canonical_lists(indices, counts, num_kv_blocks: int):
    """(indices [B,H,nQ,M] int32 in canonical form, counts [B,H,nQ] int32)."""
    M = indices.shape[-1]
    indices = indices.astype(jnp.int32)
    listed = ((jnp.arange(M) < counts[..., None]) & (indices >= 0)
              & (indices < num_kv_blocks))
    rows = jnp.sort(jnp.where(listed, indices, num_kv_blocks), axis=-1)
    repeat = jnp.concatenate([jnp.zeros_like(rows[..., :1], bool),
                              rows[..., 1:] == rows[..., :-1]], axis=-1)
    rows = jnp.sort(jnp.where(repeat, num_kv_blocks, rows), axis=-1)
    return rows, jnp.sum(rows < num_kv_blocks, axis=-1, dtype=jnp.int32)


def transposed_lists(indices, counts, num_kv_blocks: int, blocks_per_tile: int = 1):
    """For canonical lists, the query blocks that list a key block of each
    tile of ``blocks_per_tile`` consecutive key blocks, in CSR form: (offsets
    [B,H,nT+1], rows [B,H,nQ*M], listed [B,H,nQ*M]) int32 with nT =
    ceil(nK / blocks_per_tile). The query blocks listing a block of tile j
    are rows[..., offsets[j]:offsets[j+1]], ascending, and bit w of listed
    (beside each) says whether that query block lists key block
    j * blocks_per_tile + w.

    The dK/dV pass is key-parallel: a program owns one tile and must visit
    exactly the query blocks whose lists hold it. CSR keeps this as large as
    the lists themselves (a dense [nK, nQ] table would not be)."""
    B, H, nQ, M = indices.shape
    per = blocks_per_tile
    n_tiles = -(-num_kv_blocks // per)
    listed = jnp.arange(M) < counts[..., None]
    q_block = jnp.arange(nQ, dtype=jnp.int32)[:, None]
    # Sorting (tile, query block, block within the tile) codes groups each
    # tile's rows; entries past the counts sort last (tile n_tiles).
    code = jnp.where(listed, ((indices // per) * nQ + q_block) * per + indices % per,
                     n_tiles * nQ * per)
    code = jnp.sort(code.reshape(B, H, nQ * M), axis=-1)
    pair, bits = code // per, jnp.left_shift(jnp.int32(1), code % per)
    if per > 1:
        # A (tile, query block) pair holds at most ``per`` consecutive codes
        # (canonical rows repeat no block): its first gathers their bits.
        for d in range(1, per):
            pad = ((0, 0), (0, 0), (0, d))
            later = jnp.pad(pair[..., d:], pad, constant_values=-1) == pair
            bits += jnp.where(later, jnp.pad(bits[..., d:], pad), 0)
        first = jnp.concatenate([jnp.ones_like(pair[..., :1], bool),
                                 pair[..., 1:] != pair[..., :-1]], axis=-1)
        packed = jnp.sort(jnp.where(first, pair, n_tiles * nQ) * 2**per + bits, axis=-1)
        pair, bits = packed >> per, packed % 2**per
    per_tile = jax.vmap(jax.vmap(lambda c: jnp.bincount(c // nQ, length=n_tiles + 1)))(pair)
    offsets = jnp.concatenate([jnp.zeros((B, H, 1), jnp.int32),
                               jnp.cumsum(per_tile[..., :n_tiles], axis=-1,
                                          dtype=jnp.int32)], axis=-1)
    return offsets, (pair % nQ).astype(jnp.int32), bits.astype(jnp.int32)


def block_mask(indices, counts, num_kv_blocks: int):
    """bool [B,H,nQ,nK]: True where the row lists the key block (any lists:
    repeats, entries past the count and indices outside [0, nK) select nothing
    more)."""
    M = indices.shape[-1]
    listed = jnp.arange(M) < counts[..., None]
    hits = (indices[..., None] == jnp.arange(num_kv_blocks)) & listed[..., None]
    return jnp.any(hits, axis=-2)


def unmasked_prefix(indices, counts, *, block_q: int, block_k: int, offset: int, kv_len: int,
                    causal: bool, segments: bool):
    """int32 [B,H,nQ]: how many of a canonical row's first blocks every query
    row of the block sees in full (no mask needed): blocks holding no padded
    key and, when causal, lying wholly at or before the block's first query
    position (``offset`` = kv_len - q_len, the bottom-right shift). Sorted
    rows put those first. Zero with segment ids, which decide per pair."""
    if segments:
        return jnp.zeros(counts.shape, jnp.int32)
    M = indices.shape[-1]
    nQ = indices.shape[2]
    last_key = (indices + 1) * block_k - 1
    full = last_key < kv_len
    if causal:
        first_row = jnp.arange(nQ, dtype=jnp.int32)[:, None] * block_q + offset
        full &= last_key <= first_row
    full &= jnp.arange(M) < counts[..., None]
    # Canonical rows are sorted, so the fully visible blocks form a prefix.
    return jnp.sum(full, axis=-1, dtype=jnp.int32)
