"""Hopper (sm_90) block-sparse attention backward in Pallas Mosaic GPU: dK, dV
and dQ in one key-parallel kernel, the flash-attention fused backward
(attention/mosaic_gpu/backward_keys.backward_dkv) walking transposed lists.

A block owns a tile of 128 keys of one kv head (one key block of 128, or
two of 64), 64 keys a consumer, and its producer streams the 64-row query
tiles of every query block that lists a key block of the tile, for each
query head of the kv group, read from the transposed lists
(lists.transposed_lists, built in XLA during the backward). Each step is
the fused backward's: S^T and P^T, dP^T and dV, dS^T and dK, and dQ from both
consumers' dS^T tiles, reduce-added by the TMA unit into a zeroed float32
buffer (scaled and cast in XLA). dK and dV have one writer per tile; dQ is a
float32 sum whose order varies from run to run.

With block_k 64 the tile's two key blocks have their own lists: the block
streams the union of both, and a consumer whose key block a query block does
not list zeroes its probabilities (work spent where the lists of
neighbouring key blocks differ). Rows are sorted, so under a causal mask the
query tiles that cut the diagonal come first in each tile's list: XLA counts
them, and the rest run without the mask (none with segment ids, or in a tile
holding padded keys).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import tuning
from pallas_kernels.attention.mosaic_gpu.backward_keys import KeyVisits, backward_dkv
from pallas_kernels.attention.mosaic_gpu.common import CONSUMERS, Spec, sweep
from pallas_kernels.attention.mosaic_gpu.rings import KeyTile, copy_query_block, ring_steps
from pallas_kernels.attention.mosaic_gpu.schedule import block_position
from pallas_kernels.block_sparse_attention.lists import transposed_lists
from pallas_kernels.shapes import pad_axis_to_multiple

ROWS = 64         # rows a consumer owns: query rows in the forward, keys here (wgmma M)
HEAD_DIMS = (64, 128)
BLOCK_KS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TILE_KEYS = CONSUMERS * ROWS
# The fused backward's tiling (only dkv is read): 64 keys a consumer, 64-row
# query tiles, a 2-stage ring of Q and dO (what fits beside the dS^T and dQ
# tiles at head_dim 128).
_TILE = tuning.KernelBlocks(block_q=ROWS, block_kv=ROWS, stages=2)
_BLOCKS = tuning.MosaicBlockSizes(fwd=_TILE, dq=_TILE, dkv=_TILE, backward="fused")


def supports_backward(q, k, v, *, block_q: int, block_k: int) -> str | None:
    """None when the Hopper backward takes this call, else why. It takes every
    call the Hopper forward takes (``mosaic_gpu.supports`` adds the forward's
    own condition to these)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"needs bfloat16 or float16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim must be one of {HEAD_DIMS}; got {q.shape[-1]}"
    if block_k not in BLOCK_KS:
        return f"block_k must be one of {BLOCK_KS}; got {block_k}"
    if block_q % ROWS:
        return f"block_q={block_q} must be a multiple of {ROWS}"
    return None


def _masked_steps(offsets, rows, cfg, sub):
    """int32 [B,H,nT]: how many of each tile's first query-tile steps need the
    mask (the rest see every key of the tile): all with segment ids or in a
    tile holding padded keys; under a causal mask the 64-row tiles whose
    first row's position lies before the tile's last key."""
    n_tiles = offsets.shape[-1] - 1
    # Each entry's tile: the count of tile ends at or before it.
    ends = jax.vmap(jax.vmap(lambda o: jnp.zeros(rows.shape[-1] + 1, jnp.int32).at[o[1:]].add(1)))
    tile = jnp.cumsum(ends(offsets), axis=-1, dtype=jnp.int32)[..., :-1]
    if cfg.has_segments:
        steps = jnp.full(rows.shape, sub, jnp.int32)
    else:
        steps = jnp.zeros(rows.shape, jnp.int32)
        if cfg.causal:
            last_key = tile * TILE_KEYS + TILE_KEYS - 1 - (cfg.kv_len - cfg.q_len)
            first_full = -(-last_key // ROWS)  # first 64-row query tile seeing every key
            steps = jnp.clip(first_full - rows * sub, 0, sub)
        steps = jnp.where((tile + 1) * TILE_KEYS > cfg.kv_len, sub, steps)
    count = jax.vmap(jax.vmap(lambda s, t: jax.ops.segment_sum(s, t, n_tiles + 1)))
    return count(steps, tile)[..., :n_tiles].astype(jnp.int32)


def _start(per, sub, list_group, refs, spec, grid, KH, G, cols, blocks, inputs, ring, segs,
           regs, with_delta):
    """KeyVisits.start: the query tiles of a tile's transposed lists."""
    offsets_ref, codes_ref, masked_ref = refs
    b, kvh, tile = block_position(KH, grid)
    wg = lax.axis_index("wg")

    def head(g):
        """(list row, first entry, steps, masked steps) of group head g at this tile."""
        row = lax.div(kvh * G + g, list_group)
        first = offsets_ref[b, row, tile]
        return row, first, (offsets_ref[b, row, tile + 1] - first) * sub, masked_ref[b, row, tile]

    def entry(row, first, s):
        """(64-row query tile, entry code) of step s."""
        code = codes_ref[b, row, first + lax.div(s, sub)]
        return lax.div(code, 4) * sub + lax.rem(s, sub), code

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(regs[0], action="decrease")

        def per_head(g, t0):
            row, first, n, _ = head(g)

            def issue(s, slot):
                i, _ = entry(row, first, s)
                copy_query_block(inputs, ring, b, kvh * G + g, i, blocks.block_q, slot,
                                 with_delta, segs)
            ring_steps(t0, n, blocks.stages, issue, ring[8:])
            return t0 + n
        lax.fori_loop(0, G, per_head, jnp.int32(0))

    def visit(step, carry):
        def per_head(g, carry):
            acc, t0 = carry
            row, first, n, masked = head(g)

            def at(s, acc, masked):
                i, code = entry(row, first, s)
                # Two key blocks a tile: bit wg of the code's low bits says
                # whether this consumer's block is listed.
                listed = None if per == 1 else lax.rem(lax.div(code, 1 + wg), 2) == 1
                return step(i, t0 + s, g, acc, masked, listed)
            return sweep(at, 0, masked, n, n, acc), t0 + n
        return lax.fori_loop(0, G, per_head, (carry, jnp.int32(0)))[0]

    return KeyTile(b=b, kvh=kvh, wg=wg, c0=tile * cols, blocks=None, per_head=None), visit


def backward(q, k, v, lists, segs, out, lse2, do, cfg):
    """dq, dk, dv of the padded inputs (``blockspec.prepare``'s q [B,Sp,H,D],
    k/v [B,Tp,KH,D], segs () or a pair), canonical lists, and the Hopper
    forward's out and base-2 logsumexp lse2 [B,H,Sp]."""
    Tp = k.shape[1]
    k, v = (pad_axis_to_multiple(x, 1, TILE_KEYS) for x in (k, v))
    seg_pair = None
    if segs:  # padded keys are masked by position; their ids do not matter
        seg_pair = (segs[0], pad_axis_to_multiple(segs[1], 1, TILE_KEYS))
    per, sub = TILE_KEYS // cfg.block_k, cfg.block_q // ROWS
    offsets, rows, listed = transposed_lists(*lists, Tp // cfg.block_k, per)
    codes = rows * 4 + listed  # listed < 4: at most two key blocks a tile
    visits = KeyVisits(
        operands=(offsets, codes, _masked_steps(offsets, rows, cfg, sub)),
        start=functools.partial(_start, per, sub, cfg.list_group))
    spec = Spec(q_len=cfg.q_len, kv_len=cfg.kv_len, causal=cfg.causal, window=None,
                scale=cfg.scale, blocks=_BLOCKS, segments=cfg.has_segments)
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = backward_dkv(q, k, v, do, lse2, delta, seg_pair, spec, dq_acc=dq_acc,
                          visits=visits)
    return (dq_acc[...] * spec.scale).astype(q.dtype), dk[:, :Tp], dv[:, :Tp]
