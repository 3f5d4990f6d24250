"""Block geometry and pooled block scores shared by the selection policies.

Queries and keys share one block size. Query block i holds rows
[i*bs, (i+1)*bs), key block j keys [j*bs, (j+1)*bs); the last blocks may be
partial. With Sq <= Sk the causal mask is bottom-right aligned (query row s
sits at position s + Sk - Sq), as block_sparse_attention's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.shapes import cdiv


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static block counts of one (q_len, kv_len, block_size) problem."""
    q_len: int
    kv_len: int
    block_size: int

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 1 <= self.q_len <= self.kv_len:
            raise ValueError(f"selection needs 1 <= q_len <= kv_len, got q_len {self.q_len}, "
                             f"kv_len {self.kv_len}")

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return cdiv(self.kv_len, self.block_size)

    def last_causal(self) -> np.ndarray:
        """int [nQ]: the last key block each query block's causal mask reaches
        (the block of its last row's position)."""
        rows_end = np.minimum((np.arange(self.num_q_blocks) + 1) * self.block_size, self.q_len)
        return (rows_end - 1 + self.kv_len - self.q_len) // self.block_size

    def blocks(self, tokens: int) -> int:
        """Whole blocks covering ``tokens`` tokens."""
        return cdiv(tokens, self.block_size)

    def causal_and_forced(self, window: int, sinks: int):
        """bool [nQ, nK] pair: the causal blocks of each query block, and
        among them the ones every policy keeps: the window's blocks (the
        diagonal block and the ceil(window / bs) - 1 before it) and the sink
        blocks (those holding the first ``sinks`` tokens)."""
        j = jnp.arange(self.num_kv_blocks)[None, :]
        last = jnp.asarray(self.last_causal())[:, None]
        causal = j <= last
        forced = causal & ((j > last - self.blocks(window)) | (j < self.blocks(sinks)))
        return causal, forced


def forced_count(layout: Layout, window: int, sinks: int) -> int:
    """The most blocks a query block is forced to keep: the bound that the
    top-k policies' budgets must reach."""
    return layout.blocks(window) + layout.blocks(sinks)


def block_means(x, block_size: int):
    """[B, S, H, D] -> float32 [B, ceil(S / bs), H, D]: the mean of each block's
    rows (a partial last block over its own rows)."""
    B, S, H, D = x.shape
    n = cdiv(S, block_size)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block_size - S), (0, 0), (0, 0)))
    rows = np.minimum(block_size, S - np.arange(n) * block_size).astype(np.float32)
    return x.reshape(B, n, block_size, H, D).sum(axis=2) / rows[None, :, None, None]


def pooled_logits(q, k, block_size: int):
    """float32 [B, Hkv, G, nQ, nK]: mean query block . mean key block x D^-0.5
    for each query head (G = Hq / Hkv heads per kv head; query head
    h = kv * G + g). No gradient flows back to q or k: the selection is a
    discrete choice."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    qb = block_means(q, block_size).reshape(B, -1, Hkv, Hq // Hkv, D)
    kb = block_means(k, block_size)
    return jnp.einsum("bikgd,bjkd->bkgij", qb, kb) * D ** -0.5


def sorted_lists(indices, counts, num_kv_blocks: int):
    """Lists whose first ``counts`` entries are distinct valid blocks, sorted
    ascending, with nK past the count (block_sparse_attention's canonical
    form, so the lists can be checked and compared directly)."""
    listed = jnp.arange(indices.shape[-1]) < counts[..., None]
    rows = jnp.sort(jnp.where(listed, indices, num_kv_blocks), axis=-1)
    return rows.astype(jnp.int32), counts.astype(jnp.int32)


def dense_lists(layout: Layout, batch: int, heads: int):
    """Every causal key block of every query block: [B, H, nQ, nK], [B, H, nQ]."""
    shape = (batch, heads, layout.num_q_blocks)
    indices = jnp.broadcast_to(jnp.arange(layout.num_kv_blocks, dtype=jnp.int32),
                               shape + (layout.num_kv_blocks,))
    counts = jnp.broadcast_to(jnp.asarray(layout.last_causal() + 1, jnp.int32), shape)
    return sorted_lists(indices, counts, layout.num_kv_blocks)
