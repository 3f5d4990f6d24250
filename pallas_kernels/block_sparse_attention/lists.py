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


def transposed_lists(indices, counts, num_kv_blocks: int):
    """For canonical lists, the query blocks that list each key block, in CSR
    form: (offsets [B,H,nK+1], rows [B,H,nQ*M]) int32, where the query blocks
    listing key block j are rows[..., offsets[j]:offsets[j+1]], ascending.

    The dK/dV pass is key-parallel: a program owns one key block and must
    visit exactly the query blocks whose lists hold it. CSR keeps this as
    large as the lists themselves (a dense [nK, nQ] table would not be)."""
    B, H, nQ, M = indices.shape
    listed = jnp.arange(M) < counts[..., None]
    q_block = jnp.arange(nQ, dtype=jnp.int32)[:, None]
    # Sorting (key block, query block) pairs groups each key block's rows.
    code = jnp.where(listed, indices * nQ + q_block, num_kv_blocks * nQ)
    code = jnp.sort(code.reshape(B, H, nQ * M), axis=-1)
    per_block = jax.vmap(jax.vmap(lambda c: jnp.bincount(c // nQ, length=num_kv_blocks + 1)))(code)
    offsets = jnp.concatenate([jnp.zeros((B, H, 1), jnp.int32),
                               jnp.cumsum(per_block[..., :num_kv_blocks], axis=-1,
                                          dtype=jnp.int32)], axis=-1)
    return offsets, (code % nQ).astype(jnp.int32)


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
