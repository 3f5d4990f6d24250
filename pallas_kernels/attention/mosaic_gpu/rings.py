"""The producer side of the kernels: rings of shared-memory slots that a
producer warpgroup fills with TMA copies and the consumers free, the tiles a
block owns, and the segment ids that stream beside them.

Barriers: ``*_ready`` (TMA done, producer -> consumer) and ``*_free`` (both
consumers done with a slot, consumer -> producer).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention.mosaic_gpu.common import CONSUMERS
from pallas_kernels.attention.mosaic_gpu.schedule import (block_position, kv_block_range, narrow,
                                                          q_block_range, segment_span, tile_spans)


def ring_steps(t0, n_steps, stages, issue, free_barriers):
    """Producer steps t0 .. t0 + n_steps - 1 of a ring (t0 None: the ring's
    first steps): for step t, wait until slot t % stages is free, then issue
    its copies. ``issue(s, slot)`` with s = t - t0; free_barriers are waited
    in order."""

    @pl.loop(0, n_steps)
    def _(s):
        t = s if t0 is None else t0 + s
        slot = lax.rem(t, stages)

        @pl.when(t >= stages)
        def _():
            for bar in free_barriers:
                plgpu.barrier_wait(bar.at[slot])
        issue(s, slot)


def ring_producer(n_steps, stages, issue, free_barriers, regs):
    """A producer warpgroup that runs one ring of n_steps (``ring_steps``)."""
    plgpu.set_max_registers(regs[0], action="decrease")
    ring_steps(None, n_steps, stages, issue, free_barriers)


def kv_ring_scratch(cfg, D, dtype):
    """K and V ring slots and their barriers: k_smem, v_smem, k_ready,
    v_ready, k_free, v_free (the order ``query_tile`` takes them in)."""
    ring = mc.swizzled_smem((cfg.stages, cfg.block_kv, D), dtype)
    free = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=cfg.stages)
    return [ring, ring, plgpu.Barrier(num_barriers=cfg.stages),
            plgpu.Barrier(num_barriers=cfg.stages), free, free]


def kv_issue(k_ref, v_ref, ring, b, kvh, lo, bkv, segs):
    """issue(s, slot) for ``ring_steps``: K and V block lo + s (and its
    segment ids) into a ring slot."""
    k_smem, v_smem, k_ready, v_ready, _, _ = ring

    def issue(s, slot):
        keys = (b, pl.ds((lo + s) * bkv, bkv), kvh)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])
        if segs is not None:
            segs.fetch(b, (lo + s) * bkv, bkv, slot)
    return issue


@dataclasses.dataclass(frozen=True)
class QueryTile:
    b: jax.Array
    h: jax.Array
    wg: jax.Array
    r0: jax.Array      # first query row of the block
    blocks: tuple      # (lo, full_lo, full_hi, hi) key blocks, see kv_block_range


def query_tile(spec, cfg, grid, H, G, rows, k_ref, v_ref, ring, regs, segs=None):
    """This block's ``rows`` query rows and key-block range; runs the producer, which
    streams those K and V blocks into ``ring`` (``kv_ring_scratch`` refs).
    With ``segs`` (Segments) the range is cut to the keys of the tile's
    segments and their ids stream too (the slot is freed with K's)."""
    k_free, v_free = ring[4:]
    bkv = cfg.block_kv
    b, h, step = block_position(H, grid)
    wg = lax.axis_index("wg")
    tile = grid[1] - 1 - step  # causal: the last query rows see the most keys
    r0 = tile * rows
    lo, flo, fhi, hi = kv_block_range(r0, rows, block_kv=bkv, **spec.ranges())
    if segs is not None:
        lo, hi = narrow(lo, hi, segs.spans, b, tile, bkv)
    kvh = lax.div(h, G)

    @pl.when(wg == CONSUMERS)
    def _producer():
        ring_producer(hi - lo, cfg.stages, kv_issue(k_ref, v_ref, ring, b, kvh, lo, bkv, segs),
                      (k_free, v_free), regs)

    return QueryTile(b=b, h=h, wg=wg, r0=r0, blocks=(lo, flo, fhi, hi))


def segment_scratch(own_rows, stages, block):
    """Segment-id scratch: each consumer's own rows' ids (and their barriers),
    and a ring of the streamed blocks' ids with its ready barriers."""
    return [plgpu.SMEM((CONSUMERS, own_rows), jnp.int32), plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.SMEM((stages, block), jnp.int32), plgpu.Barrier(num_barriers=stages)]


@dataclasses.dataclass(frozen=True)
class Segments:
    """Segment-id refs of one kernel: ``own`` is the side a block owns (queries
    in the query-parallel kernels, keys in the key-parallel one), ``streamed``
    the side its ring brings in; spans [2,B,tiles] bound the streamed
    positions each tile's segments reach. Scratch in segment_scratch order."""
    own_ids: object
    streamed_ids: object
    spans: object
    own_smem: object
    own_ready: object
    ring_smem: object
    ring_ready: object

    def own(self, b, start, n, wg):
        """This consumer's ids [start, start + n), as the row vector of its tiles."""
        plgpu.copy_gmem_to_smem(self.own_ids.at[b, pl.ds(start, n)], self.own_smem.at[wg],
                                self.own_ready.at[wg])
        plgpu.barrier_wait(self.own_ready.at[wg])
        return plgpu.load(self.own_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))

    def fetch(self, b, start, n, slot):
        """Producer: bring streamed ids [start, start + n) into a ring slot."""
        plgpu.copy_gmem_to_smem(self.streamed_ids.at[b, pl.ds(start, n)], self.ring_smem.at[slot],
                                self.ring_ready.at[slot])

    def at(self, slot):
        """The ids of a ring slot, as the column vector of a tile."""
        plgpu.barrier_wait(self.ring_ready.at[slot])
        return plgpu.load(self.ring_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))


def query_kernel_refs(spec, refs, n_own):
    """A query-parallel body's refs after its fixed inputs -> (Segments or
    None, its n_own outputs and scratch refs, the K/V ring refs)."""
    segs = None
    if spec.segments:
        ids, refs = refs[:3], refs[3:]
        segs = Segments(*ids, *refs[n_own + 6:])
    return segs, refs[:n_own], refs[n_own:n_own + 6]


def segment_operands(segs, tile, *, key_parallel=False):
    """Kernel operands for segment ids (none without them): both id arrays and
    the span each tile of ``tile`` owned positions reaches on the streamed
    side (keys for the query-parallel kernels, query rows for the
    key-parallel one)."""
    if segs is None:
        return ()
    q_ids, kv_ids = segs
    own, streamed = (kv_ids, q_ids) if key_parallel else (q_ids, kv_ids)
    return q_ids, kv_ids, tile_spans(segment_span(own, streamed), tile)


@dataclasses.dataclass(frozen=True)
class KeyTile:
    b: jax.Array
    kvh: jax.Array
    wg: jax.Array
    c0: jax.Array        # first key of the block
    blocks: tuple        # (lo, full_lo, full_hi, hi) query blocks, see q_block_range
    per_head: jax.Array  # query blocks visited per head of the kv group


def key_tile(spec, grid, KH, G, cols, cfg, inputs, ring, segs, regs, with_delta=True):
    """This block's ``cols`` keys and its query-block range (key-parallel
    kernels); runs the producer, which streams the query blocks of every head
    of the kv group into the ring: Q, lse, dO (and delta) and their segment
    ids. inputs = (q, do, lse, delta) refs; ring = (q, do, lse, delta) slots,
    their ready barriers in the same order, then q_free, do_free."""
    q_free, do_free = ring[8:]
    bq = cfg.block_q
    b, kvh, tile = block_position(KH, grid)  # causal: the first keys have the most rows
    c0 = tile * cols
    lo, flo, fhi, hi = q_block_range(c0, cols, block_q=bq, **spec.ranges())
    if segs:  # only the query blocks of the tile's segments
        lo, hi = narrow(lo, hi, segs.spans, b, tile, bq)
    per_head = hi - lo
    wg = lax.axis_index("wg")

    @pl.when(wg == CONSUMERS)
    def _producer():
        def issue(t, slot):
            h = kvh * G + lax.div(t, per_head)
            i = lo + lax.rem(t, per_head)
            copy_query_block(inputs, ring, b, h, i, bq, slot, with_delta, segs)
        ring_producer(G * per_head, cfg.stages, issue, (q_free, do_free), regs)

    return KeyTile(b=b, kvh=kvh, wg=wg, c0=c0, blocks=(lo, flo, fhi, hi), per_head=per_head)


def copy_query_block(inputs, ring, b, h, i, bq, slot, with_delta, segs):
    """Producer of a key-parallel kernel: rows [i*bq, (i+1)*bq) of query head
    h into ring slot ``slot``: Q, lse, dO (and delta) and their segment ids
    (inputs and ring as ``key_tile`` takes them)."""
    q_ref, do_ref, lse_ref, delta_ref = inputs
    (q_smem, do_smem, lse_smem, delta_smem, q_ready, do_ready, lse_ready, delta_ready) = ring[:8]
    rows = (b, pl.ds(i * bq, bq), h)
    vec = (b, h, pl.ds(i * bq, bq))
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], lse_ready.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
    if with_delta:
        plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], delta_ready.at[slot])
    if segs:
        segs.fetch(b, i * bq, bq, slot)


def query_ring_slots(stages, bq, D, dtype):
    """A key-parallel kernel's ring of streamed query blocks: Q, dO, lse, delta."""
    return [mc.swizzled_smem((stages, bq, D), dtype), mc.swizzled_smem((stages, bq, D), dtype),
            plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32)]


def query_ring_barriers(stages):
    """Its ready barriers (Q, dO, lse, delta) and free barriers (Q, dO; both consumers)."""
    free = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages)
    return [plgpu.Barrier(num_barriers=stages)] * 4 + [free, free]


def key_segments(spec, refs):
    """A key-parallel body's refs after its fixed inputs -> (Segments or
    None, the rest): own ids are the block's keys, streamed the query blocks."""
    if not spec.segments:
        return None, refs
    (q_ids, kv_ids, spans), refs = refs[:3], refs[3:]
    return Segments(kv_ids, q_ids, spans, *refs[-4:]), refs
