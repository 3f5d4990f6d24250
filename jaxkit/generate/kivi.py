"""KIVI-2 caches (pallas_kernels.decode_attention's 2-bit format) in a
batch being generated.

kivi2_append takes every token it is handed, while a batch's prefill also
holds the padding after each prompt and a decode step the token of each
sequence that has finished. Those tokens land in their own sequence's
residual and slots only, at positions past its valid ones: the residual
rows they overwrite are put back here; the groups they complete go to slots
of positions the sequence has not reached (or to the group still filling,
which is read from the residual), which the reader never sees as long as
the padded prompt fits the cache without wrapping (so a KIVI-2 cache keeps
every position, with no sliding-window ring, and a paged one holds pages
for the padded prompt).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels.decode_attention import kivi2_append, kivi2_cache, kv_bytes_per_token

GROUP = 32  # G: tokens a key group (and the residual) holds


def value_group(head_dim: int) -> int:
    """Gv: channels a value group holds (it must divide head_dim / 4)."""
    return math.gcd(GROUP, head_dim // 4)


def check_head_dim(head_dim: int) -> None:
    if head_dim % 4:
        raise ValueError(f"kv_cache kivi2 packs 4 channels a byte: head_dim {head_dim} is not a "
                         f"multiple of 4")


def empty(leading: tuple[int, int], batch: int, kv_heads: int, head_dim: int, residual_dtype):
    """(Kivi2Keys, Kivi2Values) of slots leading + (kv_heads, head_dim) and
    batch sequences' residuals in residual_dtype."""
    return kivi2_cache((*leading, kv_heads, head_dim), batch, group=GROUP,
                       value_group=value_group(head_dim), residual_dtype=residual_dtype)


def bytes_per_token(kv_heads: int, head_dim: int) -> float:
    """One layer's bytes a token, keys and values (the residual aside)."""
    return kv_bytes_per_token("kivi2", kv_heads, head_dim, group=GROUP,
                              value_group=value_group(head_dim))


def write(keys, values, k, v, positions, valid, page_table):
    """keys, values after appending k, v [B, T, Hkv, D] at positions [B, T]
    (consecutive in each row) where valid [B, T] (a prefix of each row)."""
    G, T = keys.group, positions.shape[1]
    length = jnp.max(jnp.where(valid, positions, -1), axis=1) + 1  # 0: nothing valid
    # A row with nothing valid (a finished sequence) is appended after its
    # positions: a group it completes there is still read from the residual.
    start = jnp.where(length > 0, positions[:, 0], positions[:, -1] + 1)
    new_keys, new_values = kivi2_append(keys, values, k, v, start, page_table)
    rows = jnp.arange(G)
    # the token of this write at each residual row's position in the group still filling
    source = (length - length % G)[:, None] + rows - positions[:, :1]
    take = (source >= 0) & (rows < (length % G)[:, None])
    index = jnp.clip(source, 0, T - 1)[:, :, None, None]

    def restore(new, old, x):
        written = jnp.where((length > 0)[:, None, None, None], new.residual, old.residual)
        residual = jnp.where(take[:, :, None, None],
                             jnp.take_along_axis(x, index, axis=1).astype(written.dtype), written)
        return new._replace(residual=residual)
    return restore(new_keys, keys, k), restore(new_values, values, v)
