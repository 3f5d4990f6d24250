"""Flash-decoding's bookkeeping, shared by the kernels: the query rows a kv
head's program owns, how many splits the cache length is cut into, and the
merge of the splits' partial results.

Rows: a program owns kv head h of sequence b and every query that reads it,
the group's G query heads times the T new tokens, as rows r = t * G + g
(query head h * G + g of token t). It walks its split of the cache once for
all of them, so each KV tile is read once per group.

Each split writes its partial output, normalised by its own softmax sum, and
the logsumexp of its logits (-inf where it saw nothing); ``merge`` weighs the
partials by exp(lse - max lse).

``Schedule`` generalises splits for a kernel whose blocks each walk a range
of the pairs' tiles laid end to end (stream-K): equal ranges balance the
blocks however the pairs divide among them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from pallas_kernels.shapes import cdiv, pad_to

# A split count is kept when its blocks fill the GPU's waves within this
# fraction of the best count's: fewer splits mean less merging and longer,
# better-pipelined walks.
WAVE_SLACK = 0.05
MAX_SPLITS = 64


def query_rows(q, kv_heads: int, rows: int):
    """q [B, T, Hq, D] -> [B, Hkv, rows, D]: row t * G + g is query head
    h * G + g of token t; rows past T * G are zero."""
    B, T, Hq, D = q.shape
    G = Hq // kv_heads
    r = q.reshape(B, T, kv_heads, G, D)
    if T > 1:  # at T = 1 the rows are q's own order: a reshape, no copy
        r = r.transpose(0, 2, 1, 3, 4)
    r = r.reshape(B, kv_heads, T * G, D)
    return pad_to(r, (B, kv_heads, rows, D))


def from_query_rows(rows, num_queries: int, q_heads: int):
    """The inverse of query_rows, its padding rows already dropped:
    [B, Hkv, T * G, D] -> [B, T, Hq, D]."""
    B, kv_heads, _, D = rows.shape
    G = q_heads // kv_heads
    r = rows.reshape(B, kv_heads, num_queries, G, D)
    return r.transpose(0, 2, 1, 3, 4).reshape(B, num_queries, q_heads, D)


def merge(out, lse, valid=None):
    """out [..., parts, R, D] float32 (each part normalised, zero where it
    saw nothing), lse [..., parts, R] natural-log logsumexp (-inf: nothing)
    -> [..., R, D] float32, zero for rows that no part saw. valid
    [..., parts] bool (None: all): parts that were never written, whose
    memory may hold anything, are left out.

    The parts are few (at most 2 * MAX_SPLITS) and combined one by one in
    elementwise steps, not reductions over the parts axis: XLA fuses the
    whole merge (and what follows it) into one kernel, where reductions made
    it two or three launches, each as long as the work at batch 1."""
    def part(i):
        o, l = out[..., i, :, :], lse[..., i, :]
        if valid is None:
            return o, l
        ok = valid[..., i, None]
        return jnp.where(ok[..., None], o, 0.0), jnp.where(ok, l, -jnp.inf)
    parts = [part(i) for i in range(out.shape[-3])]
    top = functools.reduce(jnp.maximum, [l for _, l in parts])
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(l - top) for _, l in parts]
    total = functools.reduce(jnp.add, weights)
    merged = functools.reduce(jnp.add, [w[..., None] * o for w, (o, _) in zip(weights, parts)])
    return merged / jnp.where(total == 0, 1.0, total)[..., None]


def merge_query_rows(out, lse, num_queries: int, q_heads: int, dtype, valid=None):
    """A kernel's partials out [B, Hkv, parts, rows, D] and logsumexps
    [B, Hkv, parts, >= rows] -> [B, T, Hq, D] in ``dtype`` (valid: see
    ``merge``). The padding rows are sliced off before the merge, so it reads
    and weighs only the real ones."""
    real = num_queries * (q_heads // out.shape[1])
    merged = merge(out[..., :real, :], lse[..., :real], valid)
    return from_query_rows(merged, num_queries, q_heads).astype(dtype)


def default_splits(programs: int, blocks: int, sm_count: int) -> int:
    """Splits of each (sequence, kv head) pair's ``blocks`` cache blocks for
    ``programs`` pairs: the fewest whose programs fill the GPU's waves within
    WAVE_SLACK of the best count (at most one split per block, MAX_SPLITS)."""
    def filled(splits):
        n = programs * splits
        return n / (cdiv(n, sm_count) * sm_count)
    candidates = range(1, max(1, min(blocks, MAX_SPLITS)) + 1)
    best = max(filled(s) for s in candidates)
    return next(s for s in candidates if filled(s) >= best - WAVE_SLACK)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which tiles each block of a kernel walks: the pairs' tiles laid end to
    end (pair i's tile t is tile i * tiles + t), block j taking
    [bounds[j], bounds[j + 1]). Where a block's range crosses pairs it writes
    one fragment per pair; a pair's fragments come from consecutive blocks,
    and fragment k of pair i is written by block first_block[i] + k.

    bounds: P + 1 increasing tile offsets from 0 to pairs * tiles."""
    pairs: int
    tiles: int
    bounds: tuple[int, ...]

    @classmethod
    def balanced(cls, pairs: int, tiles: int, blocks: int) -> Schedule:
        """min(blocks, all tiles) blocks of equal ranges (within one tile)."""
        total = pairs * tiles
        blocks = min(blocks, total)
        return cls(pairs, tiles, tuple(j * total // blocks for j in range(blocks + 1)))

    @classmethod
    def splits(cls, pairs: int, tiles: int, num_splits: int) -> Schedule:
        """Each pair's tiles cut into min(num_splits, tiles) splits of
        cdiv(tiles, splits) tiles (fewer where that leaves an empty split),
        a block each: flash-decoding's splits."""
        per = cdiv(tiles, min(num_splits, tiles))
        starts = [i * tiles + s for i in range(pairs) for s in range(0, tiles, per)]
        return cls(pairs, tiles, (*starts, pairs * tiles))

    @property
    def blocks(self) -> int:
        return len(self.bounds) - 1

    def _block_of(self, tile):
        return np.searchsorted(self.bounds, tile, side="right") - 1

    @property
    def first_block(self) -> np.ndarray:
        """[pairs] the block that walks each pair's first tile."""
        return self._block_of(np.arange(self.pairs) * self.tiles)

    @property
    def fragments(self) -> np.ndarray:
        """[pairs] how many blocks walk each pair."""
        last = self._block_of(np.arange(1, self.pairs + 1) * self.tiles - 1)
        return last - self.first_block + 1

    @property
    def first_fragment(self) -> np.ndarray:
        """[blocks] int32: which of its pair's fragments a block's first one is."""
        lo = np.asarray(self.bounds[:-1])
        return (np.arange(self.blocks) - self.first_block[lo // self.tiles]).astype(np.int32)

    @property
    def valid(self) -> np.ndarray:
        """[pairs, max fragments] bool: the fragments written."""
        return np.arange(self.fragments.max())[None, :] < self.fragments[:, None]
