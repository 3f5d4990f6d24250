"""Flash attention for Hopper GPUs in Pallas Mosaic GPU (forward and backward).

Layout q [B,S,H,D], k/v [B,T,KH,D]; query head h reads kv head h // (H // KH).
Semantics are those of ``reference.py`` / ``mask.py`` (bottom-right alignment).

Each kernel runs three warpgroups per block: two consumers doing the math with
wgmma, one producer streaming tiles from HBM into a ring of shared-memory
slots with TMA copies. Barriers: ``*_ready`` (TMA done, producer -> consumer)
and ``*_free`` (both consumers done with a slot, consumer -> producer).

* forward: persistent, one block per multiprocessor running a list of tiles
  of 2*block_q query rows, planned on the host (``_persistent_schedule``);
  for each it walks the key blocks that any of its rows can see (others are
  skipped by the loop bounds), masking only the blocks that cut the mask.
  Softmax is online, in base 2: the row max is kept in raw logits, so
  scale*log2(e) and the max subtraction are one FMA.
  With ``pingpong`` the consumers take turns so one's softmax overlaps the
  other's matrix products.
* backward: a query-parallel kernel accumulates dQ and, where shared memory
  holds an O tile too, forms delta = rowsum(dO*O) for the next kernel (else
  XLA does, one more pass over O and dO); a key-parallel kernel accumulates
  dK and dV over the query blocks of every head of its kv group (no atomics,
  no per-head copies). At head_dim 256 one consumer cannot hold both the dK
  and dV accumulators, and two consumers' Q and dO tiles leave room for one
  K/V stage, so both kernels give their two consumers the same rows (keys,
  or queries) and split each step by role (``_backward_dkv_roles``,
  ``_backward_dq_roles``). With
  ``fused_dq`` (head_dim 64 or 128) the key-parallel kernel forms dQ too:
  the consumers share their dS^T tiles through shared memory and the TMA
  unit reduce-adds float32 partial dQ tiles (5 matrix products per step
  instead of the 7 of the two kernels; the default at head_dim 64 and 128,
  as the H200's tuned entries chose, see BENCHMARKS.md).
  With ``dv_pass`` too, that kernel forms dK and dQ only and dV comes from a
  second key-parallel pass, which keeps the fused consumers' registers within
  budget (6 products).

Logit soft-capping (c*tanh(logits/c)) costs one tanh per logit; the backward
recomputes it and scales dS by 1 - tanh^2. Segment ids (packed sequences)
arrive as two int32 operands: each consumer keeps its own rows' ids in
registers and the key (or query) blocks' ids stream through the ring beside
K (or Q). Where the ids are sorted (packed sequences) each tile visits only
the blocks of its own segments (spans found by a binary search in XLA); every
visited block is masked, since none is known to lie inside one segment.

Lengths that are not multiples of the blocks are padded here: padded keys are
masked, padded query rows are sliced off (their dO is zero in the backward).
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import compat
from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention import tuning
from pallas_kernels.attention.mask import visible

LOG2E = math.log2(math.e)
_CONSUMERS = 2
# Registers per thread (producer, consumers): the forward and the fused
# backward give their consumers the most (forward faster on H100; the fused
# kernel's dK, dV and dQ accumulators spill less, 0.14 ms faster on H200); the
# separate dQ and dK/dV kernels use the shared split (240 measured no faster).
_FWD_REGS = (24, 240)
_FUSED_REGS = _FWD_REGS
_BWD_REGS = (mc.PRODUCER_REGS, mc.CONSUMER_REGS)
HEAD_DIMS = (64, 128, 256)
# Fused backward: dS^T tiles alternate between two shared-memory buffers, so
# one barrier per step keeps a consumer from overwriting a tile the other is
# still reading (it reads step t's before it can arrive for step t + 1).
_DS_BUFFERS = 2
SPAN_SEARCH = "sort"  # jnp.searchsorted method for the segment spans
_WAVE_BLOCKS = 128  # about one block per multiprocessor of an H100 / H200 (132)
_SMEM_SPARE = 4096  # what a query-parallel kernel leaves for row statistics, barriers, segment ids
_TILE_COST = 1  # a tile's fixed cost (Q load, output store) in pipeline steps, for scheduling


# ----------------------------------------------------------------------------
# Which blocks a tile touches: shared by the kernels and tested on CPU.

def _cdiv(x, b):
    """ceil(x / b) for traced x >= 0."""
    return lax.div(x + (b - 1), b)


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
    n = _cdiv(jnp.int32(kv_len), block_kv)
    lo = _clip(lax.div(jnp.maximum(key_lo, 0), block_kv), 0, n)
    hi = _clip(_cdiv(jnp.maximum(key_hi, 0), block_kv), lo, n)
    flo = _clip(_cdiv(jnp.maximum(full_lo, 0), block_kv), lo, hi)
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
    n = _cdiv(jnp.int32(q_len), block_q)
    lo = _clip(lax.div(jnp.maximum(row_lo, 0), block_q), 0, n)
    hi = _clip(_cdiv(jnp.maximum(row_hi, 0), block_q), lo, n)
    flo = _clip(_cdiv(jnp.maximum(full_lo, 0), block_q), lo, hi)
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


def _narrow(lo, hi, spans_ref, b, tile, block):
    """Block range [lo, hi) cut to the tile's segment span (positions) in spans_ref."""
    lo = jnp.maximum(lo, lax.div(spans_ref[0, b, tile], block))
    hi = jnp.minimum(hi, _cdiv(spans_ref[1, b, tile], block))
    return lo, jnp.maximum(hi, lo)


# ----------------------------------------------------------------------------
# Static description of one call.

@dataclasses.dataclass(frozen=True)
class _Spec:
    q_len: int         # real lengths (positions and the padding mask use these)
    kv_len: int
    causal: bool
    window: int | None
    scale: float
    blocks: tuning.BlockSizes
    softcap: float | None = None
    segments: bool = False  # segment ids come as two extra kernel operands

    @property
    def offset(self):
        return self.kv_len - self.q_len

    def ranges(self):
        return dict(offset=self.offset, q_len=self.q_len, kv_len=self.kv_len,
                    causal=self.causal, window=self.window)

    def mask(self, q_pos, k_pos, q_seg=None, k_seg=None):
        """Visible pairs (positions already absolute, segment ids broadcast to
        the tile), padded keys excluded."""
        return visible(q_pos, k_pos, causal=self.causal, sliding_window=self.window,
                       q_segment=q_seg, k_segment=k_seg) & (k_pos < self.kv_len)

    def sweep_blocks(self, lo, flo, fhi, hi):
        """The block range for ``_sweep``: every block is masked when segment
        ids decide visibility (no block is known to be fully visible)."""
        return (lo, hi, hi, hi) if self.segments else (lo, flo, fhi, hi)

    @property
    def exp_scale(self):
        """Factor from ``forward_logits`` to the base-2 exponent."""
        return LOG2E if self.softcap else self.scale * LOG2E

    def forward_logits(self, s):
        """q.k products -> logits up to the factor ``exp_scale``: the raw
        products (scaling folds into the exponent's FMA), or soft-capped ones."""
        if self.softcap is None:
            return s
        return jnp.tanh(s * (self.scale / self.softcap)) * self.softcap

    def base2_logits(self, s):
        """q.k products -> (base-2 logits, the derivative of the logits w.r.t.
        the scaled products: None for 1, 1 - tanh^2 when soft-capped)."""
        if self.softcap is None:
            return s * (self.scale * LOG2E), None
        t = jnp.tanh(s * (self.scale / self.softcap))
        return t * (self.softcap * LOG2E), 1.0 - t * t


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return plgpu


def _pl():
    import jax.experimental.pallas as pl
    return pl


def _mma(a, b, shape):
    """a @ b with a fresh float32 accumulator; waits for the result."""
    pl, plgpu = _pl(), _plgpu()

    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mma_acc(acc, a, b):
    """acc + a @ b for a float32 register accumulator."""
    pl, plgpu = _pl(), _plgpu()

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def _iota(shape, dim):
    plgpu = _plgpu()
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _masked_logits(spec, s, row0, j, qs_v, ks_v):
    """Logits s [queries, keys] of a query-parallel tile (rows from row0, key
    block j) with the masked ones at -inf; qs_v and ks_v are the rows' and
    keys' segment ids (None without segments)."""
    seg = (mc.rows(qs_v, s.shape), mc.cols(ks_v, s.shape)) if spec.segments else ()
    ok = spec.mask(_iota(s.shape, 0) + (row0 + spec.offset),
                   _iota(s.shape, 1) + j * s.shape[1], *seg)
    return jnp.where(ok, s, -jnp.inf)


def _vector(n, value, reduced_dim):
    plgpu = _plgpu()
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(reduced_dim))


def _zeros(shape):
    plgpu = _plgpu()
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _block_order(pairs, tiles):
    """Grid (and axis names) for ``pairs`` (batch, head) pairs of ``tiles`` tiles.

    CUDA starts blocks in grid order, each where an earlier one ended, and
    causal tiles differ in length up to ``tiles``-fold: so tile steps go
    outside the pairs (the kernels map step 0 to their longest tile), and the
    last blocks to start are short ones. Pairs go in groups that fill the GPU
    about once, so the blocks running together read few heads' K/V (which
    stay in L2)."""
    group = next(g for g in range(1, pairs + 1)
                 if pairs % g == 0 and (g * tiles >= _WAVE_BLOCKS or g == pairs))
    return (pairs // group, tiles, group), ("group", "tile", "pair")


def _block_position(heads, grid):
    """(batch, head, tile step) of this block under ``_block_order``'s grid;
    pairs run head-fastest, so the heads of a kv group run together."""
    pair = lax.axis_index("group") * grid[2] + lax.axis_index("pair")
    return lax.div(pair, heads), lax.rem(pair, heads), lax.axis_index("tile")


@functools.lru_cache(maxsize=64)
def _persistent_schedule(pairs, tiles, steps, n_sms):
    """Which tiles each block of a persistent kernel runs: int32 [blocks, 1 +
    most], a row per block (at most n_sms), its count of tiles and then their
    codes pair * tiles + tile, in order. Tiles go in ``_block_order``'s order
    (groups of pairs, longest tiles first in a group; ``steps`` [tiles] are
    their lengths) each to the block whose estimated work ends first: what
    CUDA's block scheduler does with a grid of one block per tile."""
    grid, _ = _block_order(pairs, tiles)
    by_length = sorted(range(tiles), key=lambda t: -steps[t])
    n = min(n_sms, pairs * tiles)
    ends = [(0, i) for i in range(n)]
    lists = [[] for _ in range(n)]
    for first in range(0, pairs, grid[2]):
        for t in by_length:
            for pair in range(first, first + grid[2]):
                end, i = heapq.heappop(ends)
                lists[i].append(pair * tiles + t)
                heapq.heappush(ends, (end + steps[t] + _TILE_COST, i))
    table = np.zeros((n, 1 + max(map(len, lists))), np.int32)
    for i, codes in enumerate(lists):
        table[i, 0] = len(codes)
        table[i, 1:1 + len(codes)] = codes
    return table


def _call(body, out_type, scratch, grid, names):
    """A kernel of two consumer warpgroups and one producer over ``grid``.

    Built on pl.kernel (plgpu.kernel's batching wrapper takes no refs) so that
    a ``jax.new_ref`` operand is updated in place: the fused backward adds
    its dQ partial sums into one."""
    pl, plgpu = _pl(), _plgpu()

    def with_scratch(*refs):
        pl.run_scoped(lambda *s: body(*refs, *s), *scratch, collective_axes="wg")
    mesh = plgpu.Mesh(grid=grid, grid_names=names, num_threads=_CONSUMERS + 1, thread_name="wg")
    return pl.kernel(with_scratch, out_type=out_type, mesh=mesh,
                     compiler_params=plgpu.CompilerParams(approx_math=True))


def _ring_steps(t0, n_steps, stages, issue, free_barriers):
    """Producer steps t0 .. t0 + n_steps - 1 of a ring (t0 None: the ring's
    first steps): for step t, wait until slot t % stages is free, then issue
    its copies. ``issue(s, slot)`` with s = t - t0; free_barriers are waited
    in order."""
    pl, plgpu = _pl(), _plgpu()

    @pl.loop(0, n_steps)
    def _(s):
        t = s if t0 is None else t0 + s
        slot = lax.rem(t, stages)

        @pl.when(t >= stages)
        def _():
            for bar in free_barriers:
                plgpu.barrier_wait(bar.at[slot])
        issue(s, slot)


def _ring_producer(n_steps, stages, issue, free_barriers, regs):
    """A producer warpgroup that runs one ring of n_steps (``_ring_steps``)."""
    _plgpu().set_max_registers(regs[0], action="decrease")
    _ring_steps(None, n_steps, stages, issue, free_barriers)


def _sweep(step, lo, flo, fhi, hi, carry):
    """step(j, carry, masked) over blocks lo..hi-1, unmasked in [flo, fhi)."""
    masked = functools.partial(step, masked=True)
    carry = lax.fori_loop(lo, flo, masked, carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
    return lax.fori_loop(fhi, hi, masked, carry)


# ----------------------------------------------------------------------------
# Query-parallel kernels (forward, dQ): a block owns 2*block_q query rows and
# streams the K and V blocks they see through a ring.

def _kv_ring_scratch(cfg, D, dtype):
    """K and V ring slots and their barriers: k_smem, v_smem, k_ready,
    v_ready, k_free, v_free (the order ``_query_tile`` takes them in)."""
    plgpu = _plgpu()
    ring = mc.swizzled_smem((cfg.stages, cfg.block_kv, D), dtype)
    free = plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=cfg.stages)
    return [ring, ring, plgpu.Barrier(num_barriers=cfg.stages),
            plgpu.Barrier(num_barriers=cfg.stages), free, free]


def _kv_issue(k_ref, v_ref, ring, b, kvh, lo, bkv, segs):
    """issue(s, slot) for ``_ring_steps``: K and V block lo + s (and its
    segment ids) into a ring slot."""
    pl, plgpu = _pl(), _plgpu()
    k_smem, v_smem, k_ready, v_ready, _, _ = ring

    def issue(s, slot):
        keys = (b, pl.ds((lo + s) * bkv, bkv), kvh)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])
        if segs is not None:
            segs.fetch(b, (lo + s) * bkv, bkv, slot)
    return issue


@dataclasses.dataclass(frozen=True)
class _QueryTile:
    b: jax.Array
    h: jax.Array
    wg: jax.Array
    r0: jax.Array      # first query row of the block
    blocks: tuple      # (lo, full_lo, full_hi, hi) key blocks, see kv_block_range


def _query_tile(spec, cfg, grid, H, G, rows, k_ref, v_ref, ring, regs, segs=None):
    """This block's ``rows`` query rows and key-block range; runs the producer, which
    streams those K and V blocks into ``ring`` (``_kv_ring_scratch`` refs).
    With ``segs`` (_Segments) the range is cut to the keys of the tile's
    segments and their ids stream too (the slot is freed with K's)."""
    pl = _pl()
    k_free, v_free = ring[4:]
    bkv = cfg.block_kv
    b, h, step = _block_position(H, grid)
    wg = lax.axis_index("wg")
    tile = grid[1] - 1 - step  # causal: the last query rows see the most keys
    r0 = tile * rows
    lo, flo, fhi, hi = kv_block_range(r0, rows, block_kv=bkv, **spec.ranges())
    if segs is not None:
        lo, hi = _narrow(lo, hi, segs.spans, b, tile, bkv)
    kvh = lax.div(h, G)

    @pl.when(wg == _CONSUMERS)
    def _producer():
        _ring_producer(hi - lo, cfg.stages, _kv_issue(k_ref, v_ref, ring, b, kvh, lo, bkv, segs),
                       (k_free, v_free), regs)

    return _QueryTile(b=b, h=h, wg=wg, r0=r0, blocks=(lo, flo, fhi, hi))


# ----------------------------------------------------------------------------
# Forward.

def _segment_scratch(own_rows, stages, block):
    """Segment-id scratch: each consumer's own rows' ids (and their barriers),
    and a ring of the streamed blocks' ids with its ready barriers."""
    plgpu = _plgpu()
    return [plgpu.SMEM((_CONSUMERS, own_rows), jnp.int32), plgpu.Barrier(num_barriers=_CONSUMERS),
            plgpu.SMEM((stages, block), jnp.int32), plgpu.Barrier(num_barriers=stages)]


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Segment-id refs of one kernel: ``own`` is the side a block owns (queries
    in the query-parallel kernels, keys in the key-parallel one), ``streamed``
    the side its ring brings in; spans [2,B,tiles] bound the streamed
    positions each tile's segments reach. Scratch in _segment_scratch order."""
    own_ids: object
    streamed_ids: object
    spans: object
    own_smem: object
    own_ready: object
    ring_smem: object
    ring_ready: object

    def own(self, b, start, n, wg):
        """This consumer's ids [start, start + n), as the row vector of its tiles."""
        plgpu, pl = _plgpu(), _pl()
        plgpu.copy_gmem_to_smem(self.own_ids.at[b, pl.ds(start, n)], self.own_smem.at[wg],
                                self.own_ready.at[wg])
        plgpu.barrier_wait(self.own_ready.at[wg])
        return plgpu.load(self.own_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))

    def fetch(self, b, start, n, slot):
        """Producer: bring streamed ids [start, start + n) into a ring slot."""
        plgpu, pl = _plgpu(), _pl()
        plgpu.copy_gmem_to_smem(self.streamed_ids.at[b, pl.ds(start, n)], self.ring_smem.at[slot],
                                self.ring_ready.at[slot])

    def at(self, slot):
        """The ids of a ring slot, as the column vector of a tile."""
        plgpu = _plgpu()
        plgpu.barrier_wait(self.ring_ready.at[slot])
        return plgpu.load(self.ring_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))


def _query_kernel_refs(spec, refs, n_own):
    """A query-parallel body's refs after its fixed inputs -> (_Segments or
    None, its n_own outputs and scratch refs, the K/V ring refs)."""
    segs = None
    if spec.segments:
        ids, refs = refs[:3], refs[3:]
        segs = _Segments(*ids, *refs[n_own + 6:])
    return segs, refs[:n_own], refs[n_own:n_own + 6]


def _segment_operands(segs, tile, *, key_parallel=False):
    """Kernel operands for segment ids (none without them): both id arrays and
    the span each tile of ``tile`` owned positions reaches on the streamed
    side (keys for the query-parallel kernels, query rows for the
    key-parallel one)."""
    if segs is None:
        return ()
    q_ids, kv_ids = segs
    own, streamed = (kv_ids, q_ids) if key_parallel else (q_ids, kv_ids)
    return q_ids, kv_ids, tile_spans(segment_span(own, streamed), tile)


def _forward(q, k, v, segs, spec: _Spec):
    """q [B,Sp,H,D], k/v [B,Tp,KH,D] padded, segs None or (q ids [B,Sp], kv
    ids [B,Tp]) -> (out [B,Sp,H,D], lse2 [B,H,Sp]).

    lse2 is the base-2 logsumexp of the scaled logits, +inf for rows that see
    no key (so the backward's exp2(s - lse2) is 0 there).

    Persistent: one block per multiprocessor runs a list of query tiles
    (``_persistent_schedule``). The producer streams K and V through one ring
    across tiles, so the next tile's first blocks arrive during this tile's
    last steps; each consumer loads its next tile's Q during this one (two Q
    buffers, the output leaves through the finished one)."""
    pl, plgpu = _pl(), _plgpu()
    B, Sp, H, D = q.shape
    G = H // k.shape[2]
    cfg = spec.blocks.fwd
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    pingpong = spec.blocks.pingpong
    rows = _CONSUMERS * bq
    tiles = Sp // rows
    with jax.ensure_compile_time_eval():  # the tiles' lengths, for the schedule
        lo_all, _, _, hi_all = kv_block_range(jnp.arange(tiles, dtype=jnp.int32) * rows, rows,
                                              block_kv=bkv, **spec.ranges())
        steps = tuple(int(x) for x in jnp.broadcast_to(hi_all - lo_all, (tiles,)))
    table = _persistent_schedule(B * H, tiles, steps, compat.sm_count())
    dtype = q.dtype
    c = spec.exp_scale
    # Two Q buffers a consumer where they fit beside the ring (not at head_dim
    # 256): with one, a tile's Q load waits for the previous output's store.
    size = jnp.dtype(dtype).itemsize * D
    two_q = (2 * _CONSUMERS * bq + 2 * stages * bkv) * size + _SMEM_SPARE
    q_bufs = 2 if two_q <= mc.SMEM_PER_BLOCK else 1

    def body(q_ref, k_ref, v_ref, sched_ref, *refs):
        segs, (o_ref, lse_ref, q_smem, lse_smem, q_ready, turn), ring = \
            _query_kernel_refs(spec, refs, 6)
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
        n_items = sched_ref[sm, 0]

        def item(n):
            """(b, h, first row, key-block range) of this block's n-th tile."""
            code = sched_ref[sm, 1 + n]
            pair, tile = lax.div(code, tiles), lax.rem(code, tiles)
            b, h = lax.div(pair, H), lax.rem(pair, H)
            lo, flo, fhi, hi = kv_block_range(tile * rows, rows, block_kv=bkv, **spec.ranges())
            if segs is not None:
                lo, hi = _narrow(lo, hi, segs.spans, b, tile, bkv)
            return b, h, tile * rows, (lo, flo, fhi, hi)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(_FWD_REGS[0], action="decrease")

            def tile_blocks(n, t0):  # t0: ring steps of the earlier tiles
                b, h, _, (lo, _, _, hi) = item(n)
                issue = _kv_issue(k_ref, v_ref, ring, b, lax.div(h, G), lo, bkv, segs)
                _ring_steps(t0, hi - lo, stages, issue, (k_free, v_free))
                return t0 + (hi - lo)
            lax.fori_loop(0, n_items, tile_blocks, jnp.int32(0))

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(_FWD_REGS[1], action="increase")

            def load_q(n, buf):
                b, h, r0, _ = item(n)
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0 + wg * bq, bq), h],
                                        q_smem.at[wg, buf], q_ready.at[2 * wg + buf])

            def take_turn():
                if pingpong:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            def run_tile(n, t0):
                buf = lax.rem(n, q_bufs)
                my_q = q_smem.at[wg, buf]
                b, h, r0, blocks = item(n)
                lo = blocks[0]
                row0 = r0 + wg * bq
                qs_v = segs.own(b, row0, bq, wg) if segs else None
                # The previous tile's output stores have read their buffers:
                # the other Q buffer may take the next tile's rows.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                if q_bufs == 2:
                    @pl.when(n + 1 < n_items)
                    def _():
                        load_q(n + 1, 1 - buf)
                else:
                    load_q(n, buf)
                plgpu.barrier_wait(q_ready.at[2 * wg + buf])

                def step(j, carry, masked):
                    acc, m, l = carry
                    slot = lax.rem(t0 + j - lo, stages)
                    ks_v = segs.at(slot) if segs else None  # read before the slot is freed with K
                    plgpu.barrier_wait(k_ready.at[slot])

                    def qk(s_ref):
                        plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        take_turn()  # the other consumer's softmax overlaps this product
                        return s_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    s = spec.forward_logits(s)
                    if masked:
                        s = _masked_logits(spec, s, row0, j, qs_v, ks_v)
                    # m is the running row max of the logits before the factor c:
                    # scaling and the max subtraction are then one FMA per logit.
                    m_new = jnp.maximum(m, s.max(axis=1))
                    # A row that has seen no key yet keeps m = -inf; subtract 0 then.
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    m_scaled = m_use * c
                    alpha = jnp.exp2(m * c - m_scaled)
                    p = jnp.exp2(s * c - mc.rows(m_scaled, s.shape))
                    l = l * alpha + p.sum(axis=1)
                    acc = acc * mc.rows(alpha, acc.shape)
                    p16 = p.astype(dtype)
                    if pingpong:  # hand the tensor cores over; take them back for P V
                        plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(v_ready.at[slot])
                    if pingpong:
                        plgpu.barrier_wait(turn)
                    acc = _mma_acc(acc, p16, v_smem.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                carry = (_zeros((bq, D)), _vector(bq, -jnp.inf, 1), _vector(bq, 0.0, 1))
                acc, m, l = _sweep(step, *spec.sweep_blocks(*blocks), carry)
                empty = l == 0.0
                inv_l = 1.0 / jnp.where(empty, 1.0, l)
                my_q[...] = (acc * mc.rows(inv_l, acc.shape)).astype(dtype)
                lse_smem.at[wg][...] = jnp.where(empty, jnp.inf,
                                                 m * c + jnp.log(jnp.where(empty, 1.0, l)) * LOG2E)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(row0, bq), h])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
                return t0 + (blocks[3] - lo)

            if q_bufs == 2:
                @pl.when(n_items > 0)
                def _():
                    load_q(0, 0)
            if pingpong:  # consumer 1 runs half a step behind consumer 0 throughout
                pl.when(wg == 1)(take_turn)
            lax.fori_loop(0, n_items, run_tile, jnp.int32(0))
            if pingpong:
                pl.when(wg == 0)(take_turn)
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((_CONSUMERS, q_bufs, bq, D), dtype),
        plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
        plgpu.Barrier(num_barriers=2 * _CONSUMERS),
        plgpu.Barrier(num_arrivals=_CONSUMERS),
        *_kv_ring_scratch(cfg, D, dtype),
    ] + (_segment_scratch(bq, stages, bkv) if spec.segments else [])
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((B, H, Sp), jnp.float32))
    return _call(body, out_type, scratch, (table.shape[0],), ("sm",))(
        q, k, v, jnp.asarray(table), *_segment_operands(segs, rows))


# ----------------------------------------------------------------------------
# Backward: dQ, query-parallel.

def _dq_folds_delta(spec: _Spec, D, dtype) -> bool:
    """Whether the dQ kernel has shared memory for an O tile beside Q, dO and
    the K/V ring, to form delta itself (not at head_dim 256)."""
    cfg = spec.blocks.dq
    tiles = 3 * _CONSUMERS * cfg.block_q + 2 * cfg.stages * cfg.block_kv
    return tiles * D * jnp.dtype(dtype).itemsize + _SMEM_SPARE <= mc.SMEM_PER_BLOCK


def _backward_dq(q, k, v, do, lse, out_or_delta, segs, spec: _Spec):
    """dQ [B,Sp,H,D], and delta = rowsum(dO*O) [B,H,Sp] where
    ``_dq_folds_delta`` (then ``out_or_delta`` is O: the rows' dO and O tiles
    are in shared memory at the start anyway, and the key-parallel kernel
    reads the delta written here); else ``out_or_delta`` is delta and the
    second result None."""
    pl, plgpu = _pl(), _plgpu()
    B, Sp, H, D = q.shape
    G = H // k.shape[2]
    cfg = spec.blocks.dq
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    grid, names = _block_order(B * H, Sp // (_CONSUMERS * bq))
    dtype = q.dtype
    fold = _dq_folds_delta(spec, D, dtype)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, od_ref, *refs):
        segs, own, ring = _query_kernel_refs(spec, refs, 6 + 2 * fold)
        if fold:  # delta's output and the O tiles
            (dq_ref, delta_out, *own), o_smem = own[:-1], own[-1]
        else:
            dq_ref, *own = own
        q_smem, do_smem, lse_smem, delta_smem, row_ready = own
        tile = _query_tile(spec, cfg, grid, H, G, _CONSUMERS * bq, k_ref, v_ref, ring, _BWD_REGS,
                           segs)
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        b, h, wg = tile.b, tile.h, tile.wg
        lo = tile.blocks[0]

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(_BWD_REGS[1], action="increase")
            row0 = tile.r0 + wg * bq
            rows = (b, pl.ds(row0, bq), h)
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            ready = [row_ready.at[wg * 4 + i] for i in range(4)]
            plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, ready[0])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], my_do, ready[1])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(row0, bq)], lse_smem.at[wg], ready[2])
            vec = (b, h, pl.ds(row0, bq))
            if fold:
                plgpu.copy_gmem_to_smem(od_ref.at[rows], o_smem.at[wg], ready[3])
            else:
                plgpu.copy_gmem_to_smem(od_ref.at[vec], delta_smem.at[wg], ready[3])
            qs_v = segs.own(b, row0, bq, wg) if segs else None
            for bar in ready:
                plgpu.barrier_wait(bar)
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lse_v = plgpu.load(lse_smem.at[wg], (), layout=row_layout)
            if fold:
                f32 = lambda ref: ref[...].astype(jnp.float32)  # noqa: E731
                delta_v = jnp.sum(f32(my_do) * f32(o_smem.at[wg]), axis=1)
                delta_smem.at[wg][...] = delta_v
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(delta_smem.at[wg], delta_out.at[vec])
            else:
                delta_v = plgpu.load(delta_smem.at[wg], (), layout=row_layout)

            def step(j, dq, masked):
                slot = lax.rem(j - lo, stages)
                ks_v = segs.at(slot) if segs else None
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                def s_and_dp(s_ref, dp_ref):  # both in flight, one wait
                    plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    plgpu.wgmma(dp_ref, my_do, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                    return s_ref[...], dp_ref[...]
                acc = plgpu.ACC((bq, bkv), jnp.float32)
                s, dp = pl.run_scoped(s_and_dp, acc, acc)
                plgpu.barrier_arrive(v_free.at[slot])
                s, dcap = spec.base2_logits(s)
                if masked:
                    s = _masked_logits(spec, s, row0, j, qs_v, ks_v)
                p = jnp.exp2(s - mc.rows(lse_v, s.shape))
                ds = p * (dp - mc.rows(delta_v, dp.shape))
                if dcap is not None:
                    ds = ds * dcap
                dq = _mma_acc(dq, ds.astype(dtype), k_smem.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = _sweep(step, *spec.sweep_blocks(*tile.blocks), _zeros((bq, D)))
            my_q[...] = (dq * spec.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows])
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((_CONSUMERS, bq, D), dtype),
        mc.swizzled_smem((_CONSUMERS, bq, D), dtype),
        plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
        plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
        plgpu.Barrier(num_barriers=_CONSUMERS * 4),
        *([mc.swizzled_smem((_CONSUMERS, bq, D), dtype)] if fold else []),
        *_kv_ring_scratch(cfg, D, dtype),
    ] + (_segment_scratch(bq, stages, bkv) if spec.segments else [])
    out_type = jax.ShapeDtypeStruct(q.shape, dtype)
    if fold:
        out_type = (out_type, jax.ShapeDtypeStruct(lse.shape, jnp.float32))
    res = _call(body, out_type, scratch, grid, names)(
        q, k, v, do, lse, out_or_delta, *_segment_operands(segs, _CONSUMERS * bq))
    return tuple(res) if fold else (res, None)


def _backward_dq_roles(q, k, v, do, lse, delta, segs, spec: _Spec):
    """dQ for head_dim 256, where the query-parallel kernel's Q and dO tiles
    for two consumers' rows leave shared memory for one K/V stage only.

    The consumers share a block's block_q query rows and split each step by
    role: consumer 1 forms P = exp(S - lse) from Q K^T and hands it over in
    shared memory; consumer 0 forms dP = dO V^T and dS = P (dP - delta) and
    hands dS back; each adds dS K into its half of dQ's columns. One Q and
    one dO tile stay resident, so the K/V ring gets two stages. They are kept
    as column halves, so each consumer's dQ half leaves through a contiguous
    half of its own tile (TMA takes no strided shared memory)."""
    pl, plgpu = _pl(), _plgpu()
    B, Sp, H, D = q.shape
    G = H // k.shape[2]
    cfg = spec.blocks.dq
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    assert (bq, bkv) == (64, 64), "checked by mosaic_flash_attention"
    grid, names = _block_order(B * H, Sp // bq)
    dtype = q.dtype
    ds_side, p_side = 0, 1  # consumer warpgroups by role
    half = D // 2

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        segs, own, ring = _query_kernel_refs(spec, refs, 11)
        (dq_ref, q_smem, do_smem, vec_smem, p_smem, ds_smem, row_ready,
         p_ready, p_free, ds_ready, ds_free) = own
        tile = _query_tile(spec, cfg, grid, H, G, bq, k_ref, v_ref, ring, _BWD_REGS, segs)
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        b, h, wg, lo = tile.b, tile.h, tile.wg, tile.blocks[0]
        vec = (b, h, pl.ds(tile.r0, bq))
        row_layout = plgpu.Layout.WGMMA.reduce(1)

        def own_tiles(tile_ref, tile_smem, vec_ref):
            """This consumer's resident tile (Q or dO, in column halves) and
            row vector (lse or delta)."""
            ready = [row_ready.at[3 * wg + i] for i in range(3)]
            for u in range(2):
                plgpu.copy_gmem_to_smem(tile_ref.at[b, pl.ds(tile.r0, bq), h, pl.ds(u * half, half)],
                                        tile_smem.at[u], ready[u])
            plgpu.copy_gmem_to_smem(vec_ref.at[vec], vec_smem.at[wg], ready[2])
            for bar in ready:
                plgpu.barrier_wait(bar)
            return plgpu.load(vec_smem.at[wg], (), layout=row_layout)

        def by_halves(tile_smem, other):
            """tile @ other^T for a resident tile in column halves."""
            def body(acc):
                for u in range(2):
                    plgpu.wgmma(acc, tile_smem.at[u], plgpu.transpose_ref(
                        other.at[:, pl.ds(u * half, half)], (1, 0)))
                return acc[...]
            return pl.run_scoped(body, plgpu.ACC((bq, bkv), jnp.float32))

        def sweep_and_store(step, tile_smem, u):
            """Run the steps into this consumer's dQ column half u and write it
            out through that half of its (no longer read) resident tile."""
            dq = _sweep(step, *spec.sweep_blocks(*tile.blocks), _zeros((bq, half)))
            out = tile_smem.at[u]
            out[...] = (dq * spec.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, dq_ref.at[b, pl.ds(tile.r0, bq), h, pl.ds(u * half, half)])
            mc.wait_stores_before_exit()

        @pl.when(wg == p_side)
        def _p_side():
            plgpu.set_max_registers(_BWD_REGS[1], action="increase")
            lse_v = own_tiles(q_ref, q_smem, lse_ref)
            qs_v = segs.own(b, tile.r0, bq, p_side) if segs else None
            plgpu.barrier_arrive(ds_free)  # the dS tile starts free

            def step(j, dq, masked):
                slot = lax.rem(j - lo, stages)
                plgpu.barrier_arrive(v_free.at[slot])  # V is the other side's
                ks_v = segs.at(slot) if segs else None
                plgpu.barrier_wait(k_ready.at[slot])
                s, dcap = spec.base2_logits(by_halves(q_smem, k_smem.at[slot]))
                if masked:
                    s = _masked_logits(spec, s, tile.r0, j, qs_v, ks_v)
                p = jnp.exp2(s - mc.rows(lse_v, s.shape))
                plgpu.barrier_wait(p_free)
                p_smem[...] = p if dcap is None else p * dcap
                plgpu.barrier_arrive(p_ready)
                plgpu.barrier_wait(ds_ready)
                dq = _mma_acc(dq, ds_smem, k_smem.at[slot, :, pl.ds(half, half)])
                plgpu.barrier_arrive(ds_free)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            sweep_and_store(step, q_smem, 1)

        @pl.when(wg == ds_side)
        def _ds_side():
            plgpu.set_max_registers(_BWD_REGS[1], action="increase")
            delta_v = own_tiles(do_ref, do_smem, delta_ref)
            plgpu.barrier_arrive(p_free)  # the P tile starts free

            def step(j, dq, masked):
                del masked  # P comes masked
                slot = lax.rem(j - lo, stages)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = by_halves(do_smem, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                plgpu.barrier_wait(p_ready)
                p = p_smem[...]
                plgpu.barrier_arrive(p_free)
                ds = (p * (dp - mc.rows(delta_v, dp.shape))).astype(dtype)
                plgpu.barrier_wait(ds_free)
                ds_smem[...] = ds
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready)
                plgpu.barrier_wait(k_ready.at[slot])
                dq = _mma_acc(dq, ds, k_smem.at[slot, :, pl.ds(0, half)])
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            sweep_and_store(step, do_smem, 0)

    scratch = [
        mc.swizzled_smem((2, bq, half), dtype),
        mc.swizzled_smem((2, bq, half), dtype),
        plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
        mc.swizzled_smem((bq, bkv), jnp.float32),
        mc.swizzled_smem((bq, bkv), dtype),
        plgpu.Barrier(num_barriers=_CONSUMERS * 3),
        plgpu.Barrier(),
        plgpu.Barrier(),
        plgpu.Barrier(),
        plgpu.Barrier(),
        *_kv_ring_scratch(cfg, D, dtype),
    ] + (_segment_scratch(bq, stages, bkv) if spec.segments else [])
    return _call(body, jax.ShapeDtypeStruct(q.shape, dtype), scratch, grid, names)(
        q, k, v, do, lse, delta, *_segment_operands(segs, bq))


# ----------------------------------------------------------------------------
# Backward: dK and dV (and, fused, dQ), key-parallel, summed over the heads of
# each kv group.

@dataclasses.dataclass(frozen=True)
class _KeyTile:
    b: jax.Array
    kvh: jax.Array
    wg: jax.Array
    c0: jax.Array        # first key of the block
    blocks: tuple        # (lo, full_lo, full_hi, hi) query blocks, see q_block_range
    per_head: jax.Array  # query blocks visited per head of the kv group


def _key_tile(spec, grid, KH, G, cols, cfg, inputs, ring, segs, regs, with_delta=True):
    """This block's ``cols`` keys and its query-block range (key-parallel
    kernels); runs the producer, which streams the query blocks of every head
    of the kv group into the ring: Q, lse, dO (and delta) and their segment
    ids. inputs = (q, do, lse, delta) refs; ring = (q, do, lse, delta) slots,
    their ready barriers in the same order, then q_free, do_free."""
    pl, plgpu = _pl(), _plgpu()
    q_ref, do_ref, lse_ref, delta_ref = inputs
    (q_smem, do_smem, lse_smem, delta_smem,
     q_ready, do_ready, lse_ready, delta_ready, q_free, do_free) = ring
    bq = cfg.block_q
    b, kvh, tile = _block_position(KH, grid)  # causal: the first keys have the most rows
    c0 = tile * cols
    lo, flo, fhi, hi = q_block_range(c0, cols, block_q=bq, **spec.ranges())
    if segs:  # only the query blocks of the tile's segments
        lo, hi = _narrow(lo, hi, segs.spans, b, tile, bq)
    per_head = hi - lo
    wg = lax.axis_index("wg")

    @pl.when(wg == _CONSUMERS)
    def _producer():
        def issue(t, slot):
            h = kvh * G + lax.div(t, per_head)
            i = lo + lax.rem(t, per_head)
            rows = (b, pl.ds(i * bq, bq), h)
            vec = (b, h, pl.ds(i * bq, bq))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
            if with_delta:
                plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot],
                                        delta_ready.at[slot])
            if segs:
                segs.fetch(b, i * bq, bq, slot)
        _ring_producer(G * per_head, cfg.stages, issue, (q_free, do_free), regs)

    return _KeyTile(b=b, kvh=kvh, wg=wg, c0=c0, blocks=(lo, flo, fhi, hi), per_head=per_head)


def _probs_t(spec, st, masked, lse_slot, i, key0, segs, slot, ks_v):
    """P^T = exp2(S^T - lse) of a key-parallel tile of base-2 logits st [keys,
    queries] (query block i, keys from key0), masked where ``masked``; with
    segs, ring slot ``slot`` holds the query block's ids and ks_v the keys'."""
    plgpu = _plgpu()
    if masked:
        seg = ()
        if segs:
            qs_v = segs.at(slot)
            seg = (mc.cols(qs_v, st.shape), mc.rows(ks_v, st.shape))
        ok = spec.mask(_iota(st.shape, 1) + (i * st.shape[1] + spec.offset),
                       _iota(st.shape, 0) + key0, *seg)
        st = jnp.where(ok, st, -jnp.inf)
    lse_v = plgpu.load(lse_slot, (), layout=plgpu.Layout.WGMMA.reduce(0))
    return jnp.exp2(st - mc.cols(lse_v, st.shape))


def _key_parallel_shape(q, k):
    """(batch, head_dim, kv heads, query heads per kv head) of a backward call."""
    return q.shape[0], q.shape[3], k.shape[2], q.shape[2] // k.shape[2]


def _query_ring_slots(stages, bq, D, dtype):
    """A key-parallel kernel's ring of streamed query blocks: Q, dO, lse, delta."""
    plgpu = _plgpu()
    return [mc.swizzled_smem((stages, bq, D), dtype), mc.swizzled_smem((stages, bq, D), dtype),
            plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32)]


def _query_ring_barriers(stages):
    """Its ready barriers (Q, dO, lse, delta) and free barriers (Q, dO; both consumers)."""
    plgpu = _plgpu()
    free = plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages)
    return [plgpu.Barrier(num_barriers=stages)] * 4 + [free, free]


def _key_segments(spec, refs):
    """A key-parallel body's refs after its fixed inputs -> (_Segments or
    None, the rest): own ids are the block's keys, streamed the query blocks."""
    if not spec.segments:
        return None, refs
    (q_ids, kv_ids, spans), refs = refs[:3], refs[3:]
    return _Segments(kv_ids, q_ids, spans, *refs[-4:]), refs


def _backward_dkv(q, k, v, do, lse, delta, segs, spec: _Spec, want_dk=True, want_dv=True,
                  dq_acc=None):
    """dK, dV for k/v [B,Tp,KH,D] (None where not wanted).

    With ``dq_acc`` (a float32 [B,Sp,H,D] ``jax.new_ref`` of zeros) the kernel
    also adds dQ/scale into it, so no second pass recomputes S and dP (5
    matrix products per step instead of 7). Each step's dS^T tiles of both
    consumers go to shared memory; consumer w then forms the partial dQ of
    head-dim columns [w*D/2, (w+1)*D/2) over the block's keys, and the TMA
    unit reduce-adds it (float32) into dq_acc."""
    pl, plgpu = _pl(), _plgpu()
    B, D, KH, G = _key_parallel_shape(q, k)
    cfg = spec.blocks.dkv
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    grid, names = _block_order(B * KH, k.shape[1] // (_CONSUMERS * bkv))
    dtype = q.dtype
    need_v = want_dk  # dP = dO V^T feeds only dK (and dQ)
    fused = dq_acc is not None
    regs = _FUSED_REGS if fused else _BWD_REGS
    # Fused dQ work split: at head_dim 128 each consumer forms half of dQ's
    # columns every step; a 32-column half of a 64-wide tile is no wgmma
    # operand, so at 64 the consumers take whole dQ tiles on alternate steps.
    split_cols = D == 128
    dq_cols = D // _CONSUMERS if split_cols else D
    assert not fused or (want_dk and D in (64, 128)), "checked by mosaic_flash_attention"

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        segs, refs = _key_segments(spec, refs)
        if fused:
            dq_ref, refs = refs[0], refs[1:]
        n_out = want_dk + want_dv
        outs, refs = refs[:n_out], refs[n_out:]
        (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
         own_ready, q_ready, do_ready, lse_ready, delta_ready, q_free, do_free) = refs[:13]
        if fused:
            ds_smem, dq_smem, ds_ready, dq_done = refs[13:17]
        dk_ref = outs[0] if want_dk else None
        dv_ref = outs[-1] if want_dv else None
        tile = _key_tile(
            spec, grid, KH, G, _CONSUMERS * bkv, cfg, (q_ref, do_ref, lse_ref, delta_ref),
            (q_smem, do_smem, lse_smem, delta_smem, q_ready, do_ready, lse_ready, delta_ready,
             q_free, do_free), segs, regs, with_delta=want_dk)
        b, kvh, wg, per_head, lo = tile.b, tile.kvh, tile.wg, tile.per_head, tile.blocks[0]

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(regs[1], action="increase")
            key0 = tile.c0 + wg * bkv
            keys = (b, pl.ds(key0, bkv), kvh)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[keys], my_k, own_ready.at[2 * wg])
            if need_v:
                plgpu.copy_gmem_to_smem(v_ref.at[keys], my_v, own_ready.at[2 * wg + 1])
            plgpu.barrier_wait(own_ready.at[2 * wg])
            if need_v:
                plgpu.barrier_wait(own_ready.at[2 * wg + 1])
            if fused:  # dQ reads the other consumer's keys too
                plgpu.barrier_wait(own_ready.at[2 * (1 - wg)])
            ks_v = segs.own(b, key0, bkv, wg) if segs else None
            col_layout = plgpu.Layout.WGMMA.reduce(0)

            cols = pl.ds(wg * dq_cols if split_cols else 0, dq_cols)

            def dk_and_dq(dk, dst, q_slot, t, i, h):
                """dK += dS^T Q; once both consumers' dS^T tiles of step t are
                in shared memory, this consumer's dQ columns (or, at head_dim
                64, every other step's whole dQ tile), reduce-added."""
                buf = lax.rem(t, _DS_BUFFERS)
                ds_smem.at[buf, wg][...] = dst
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[buf])

                def with_dq(dk):
                    def products(refs):  # dK in flight while waiting for the other dS^T
                        plgpu.wgmma(refs[0], dst, q_slot)
                        plgpu.barrier_wait(ds_ready.at[buf])
                        for u in range(_CONSUMERS):
                            plgpu.wgmma(refs[1], plgpu.transpose_ref(ds_smem.at[buf, u], (1, 0)),
                                        k_smem.at[u, :, cols])
                    dk, dq = pl.run_state(products)((plgpu.ACC.init(dk),
                                                     plgpu.ACC.init(_zeros((bq, dq_cols)))))
                    my_dq = dq_smem.at[wg]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last add has read it
                    my_dq[...] = dq
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(my_dq, dq_ref.at[b, pl.ds(i * bq, bq), h, cols],
                                            reduction_op="add")
                    return dk

                if split_cols:
                    return with_dq(dk)

                def dk_only(dk):
                    dk = _mma_acc(dk, dst, q_slot)
                    plgpu.barrier_wait(ds_ready.at[buf])  # every phase, as the other consumer
                    return dk
                return lax.cond(lax.rem(t, _CONSUMERS) == wg, with_dq, dk_only, dk)

            def step(i, carry, g, masked):
                dk, dv = carry
                t = g * per_head + (i - lo)
                slot = lax.rem(t, stages)
                q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])
                st, dcap = spec.base2_logits(
                    _mma(my_k, plgpu.transpose_ref(q_slot, (1, 0)), (bkv, bq)))
                pt = _probs_t(spec, st, masked, lse_smem.at[slot], i, key0, segs, slot, ks_v)
                plgpu.barrier_wait(do_ready.at[slot])
                if not want_dk:
                    dv = _mma_acc(dv, pt.astype(dtype), do_slot)
                    plgpu.barrier_arrive(do_free.at[slot])
                    plgpu.barrier_arrive(q_free.at[slot])
                    return dk, dv

                def dpt_and_dv(refs):  # both in flight, one wait
                    plgpu.wgmma(refs[0], my_v, plgpu.transpose_ref(do_slot, (1, 0)))
                    if want_dv:
                        plgpu.wgmma(refs[1], pt.astype(dtype), do_slot)
                accs = (_zeros((bkv, bq)),) + ((dv,) if want_dv else ())
                dpt, *dv_new = pl.run_state(dpt_and_dv)(tuple(map(plgpu.ACC.init, accs)))
                dv = dv_new[0] if want_dv else None
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_wait(delta_ready.at[slot])
                delta_v = plgpu.load(delta_smem.at[slot], (), layout=col_layout)
                dst = pt * (dpt - mc.cols(delta_v, dpt.shape))
                dst = (dst if dcap is None else dst * dcap).astype(dtype)
                if fused:
                    dk = dk_and_dq(dk, dst, q_slot, t, i, kvh * G + g)
                else:
                    dk = _mma_acc(dk, dst, q_slot)
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            def head(g, carry):
                return _sweep(functools.partial(step, g=g), *spec.sweep_blocks(*tile.blocks),
                              carry)

            zero = _zeros((bkv, D))
            dk, dv = lax.fori_loop(0, G, head, (zero if want_dk else None,
                                                 zero if want_dv else None))
            if fused:  # the other consumer may still read my K for its dQ
                plgpu.barrier_arrive(dq_done)
                plgpu.barrier_wait(dq_done)
            if want_dk:
                my_k[...] = (dk * spec.scale).astype(dtype)
            if want_dv:
                my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            if want_dk:
                plgpu.copy_smem_to_gmem(my_k, dk_ref.at[keys])
            if want_dv:
                plgpu.copy_smem_to_gmem(my_v, dv_ref.at[keys])
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((_CONSUMERS, bkv, D), dtype),
        mc.swizzled_smem((_CONSUMERS, bkv, D), dtype),
        *_query_ring_slots(stages, bq, D, dtype),
        plgpu.Barrier(num_barriers=_CONSUMERS * 2),
        *_query_ring_barriers(stages),
    ]
    if fused:
        scratch += [
            mc.swizzled_smem((_DS_BUFFERS, _CONSUMERS, bkv, bq), dtype),
            mc.swizzled_smem((_CONSUMERS, bq, dq_cols), jnp.float32),
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_DS_BUFFERS),
            plgpu.Barrier(num_arrivals=_CONSUMERS),
        ]
    if spec.segments:
        scratch += _segment_scratch(bkv, stages, bq)
    out_type = [jax.ShapeDtypeStruct(k.shape, dtype)] * (want_dk + want_dv)
    seg_args = _segment_operands(segs, _CONSUMERS * bkv, key_parallel=True)
    args = (q, k, v, do, lse, delta, *seg_args) + ((dq_acc,) if fused else ())
    outs = _call(body, out_type, scratch, grid, names)(*args)
    return (outs[0] if want_dk else None), (outs[-1] if want_dv else None)


def _backward_dkv_roles(q, k, v, do, lse, delta, segs, spec: _Spec):
    """dK, dV for head_dim 256, where one consumer cannot hold both
    accumulators (64x256 float32: 128 registers a thread each).

    The consumers share a block's block_kv keys and split each step by role:
    consumer 1 forms P^T = exp(S^T - lse) and dV += P^T dO; consumer 0 forms
    dP^T = V dO^T, takes P^T (times the soft-cap's derivative) from consumer 1
    through shared memory, and dK += dS^T Q. Two matrix products a step each,
    four in all, where separate dK and dV passes take five and stream Q and
    dO twice."""
    pl, plgpu = _pl(), _plgpu()
    B, D, KH, G = _key_parallel_shape(q, k)
    cfg = spec.blocks.dkv
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    assert (bq, bkv) == (64, 64), "checked by mosaic_flash_attention"
    grid, names = _block_order(B * KH, k.shape[1] // bkv)
    dtype = q.dtype
    ds_side, p_side = 0, 1  # consumer warpgroups by role

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        segs, refs = _key_segments(spec, refs)
        (dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, p_smem,
         own_ready, q_ready, do_ready, lse_ready, delta_ready, q_free, do_free,
         p_ready, p_free) = refs[:18]
        tile = _key_tile(
            spec, grid, KH, G, bkv, cfg, (q_ref, do_ref, lse_ref, delta_ref),
            (q_smem, do_smem, lse_smem, delta_smem, q_ready, do_ready, lse_ready, delta_ready,
             q_free, do_free), segs, _BWD_REGS)
        b, wg, per_head, lo, key0 = tile.b, tile.wg, tile.per_head, tile.blocks[0], tile.c0
        keys = (b, pl.ds(key0, bkv), tile.kvh)

        col_layout = plgpu.Layout.WGMMA.reduce(0)

        def over_heads(step, acc):
            def head(g, acc):
                return _sweep(functools.partial(step, g=g), *spec.sweep_blocks(*tile.blocks),
                              acc)
            return lax.fori_loop(0, G, head, acc)

        def store(acc, own_smem, out_ref):
            """Write a [bkv, D] result through this consumer's own (no longer
            read) K or V tile."""
            own_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(own_smem, out_ref.at[keys])
            mc.wait_stores_before_exit()

        @pl.when(wg == p_side)
        def _p_side():
            plgpu.set_max_registers(_BWD_REGS[1], action="increase")
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, own_ready.at[p_side])
            plgpu.barrier_wait(own_ready.at[p_side])
            ks_v = segs.own(b, key0, bkv, p_side) if segs else None

            def step(i, dv, g, masked):
                slot = lax.rem(g * per_head + (i - lo), stages)
                q_slot = q_smem.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])
                st, dcap = spec.base2_logits(
                    _mma(k_smem, plgpu.transpose_ref(q_slot, (1, 0)), (bkv, bq)))
                plgpu.barrier_arrive(q_free.at[slot])
                pt = _probs_t(spec, st, masked, lse_smem.at[slot], i, key0, segs, slot, ks_v)
                plgpu.barrier_wait(p_free)
                p_smem[...] = pt if dcap is None else pt * dcap
                plgpu.barrier_arrive(p_ready)
                plgpu.barrier_wait(do_ready.at[slot])
                dv = _mma_acc(dv, pt.astype(dtype), do_smem.at[slot])
                plgpu.barrier_arrive(do_free.at[slot])
                return dv

            store(over_heads(step, _zeros((bkv, D))), k_smem, dv_ref)

        @pl.when(wg == ds_side)
        def _ds_side():
            plgpu.set_max_registers(_BWD_REGS[1], action="increase")
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, own_ready.at[ds_side])
            plgpu.barrier_wait(own_ready.at[ds_side])
            plgpu.barrier_arrive(p_free)  # the P^T tile starts free

            def step(i, dk, g, masked):
                del masked  # P^T comes masked
                slot = lax.rem(g * per_head + (i - lo), stages)
                do_slot = do_smem.at[slot]
                plgpu.barrier_wait(do_ready.at[slot])
                dpt = _mma(v_smem, plgpu.transpose_ref(do_slot, (1, 0)), (bkv, bq))
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_wait(delta_ready.at[slot])
                delta_v = plgpu.load(delta_smem.at[slot], (), layout=col_layout)
                plgpu.barrier_wait(p_ready)
                pt = p_smem[...]
                plgpu.barrier_arrive(p_free)
                dst = (pt * (dpt - mc.cols(delta_v, dpt.shape))).astype(dtype)
                plgpu.barrier_wait(q_ready.at[slot])
                dk = _mma_acc(dk, dst, q_smem.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                return dk

            store(over_heads(step, _zeros((bkv, D))) * spec.scale, v_smem, dk_ref)

    scratch = [
        mc.swizzled_smem((bkv, D), dtype),
        mc.swizzled_smem((bkv, D), dtype),
        *_query_ring_slots(stages, bq, D, dtype),
        mc.swizzled_smem((bkv, bq), jnp.float32),
        plgpu.Barrier(num_barriers=_CONSUMERS),
        *_query_ring_barriers(stages),
        plgpu.Barrier(),
        plgpu.Barrier(),
    ]
    if spec.segments:
        scratch += _segment_scratch(bkv, stages, bq)
    out_type = [jax.ShapeDtypeStruct(k.shape, dtype)] * 2
    seg_args = _segment_operands(segs, bkv, key_parallel=True)
    dk, dv = _call(body, out_type, scratch, grid, names)(q, k, v, do, lse, delta, *seg_args)
    return dk, dv


# ----------------------------------------------------------------------------
# Differentiable entry point.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segs, spec):
    return _forward(q, k, v, segs, spec)[0]


def _attention_fwd(q, k, v, segs, spec):
    out, lse = _forward(q, k, v, segs, spec)
    return out, (q, k, v, segs, out, lse)


def _attention_bwd(spec, res, do):
    q, k, v, segs, out, lse = res
    dq = None
    if not spec.blocks.fused_dq and _dq_folds_delta(spec, q.shape[-1], q.dtype):
        dq, delta = _backward_dq(q, k, v, do, lse, out, segs, spec)
    else:
        delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (q, k, v, do, lse, delta, segs, spec)
    if spec.blocks.fused_dq:
        dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
        if spec.blocks.dv_pass:
            dk, _ = _backward_dkv(*args, want_dv=False, dq_acc=dq_acc)
            _, dv = _backward_dkv(*args, want_dk=False)
        else:
            dk, dv = _backward_dkv(*args, dq_acc=dq_acc)
        dq = (dq_acc[...] * spec.scale).astype(q.dtype)
    elif q.shape[-1] > 128:  # one consumer's registers and shared memory take too little
        dq = _backward_dq_roles(*args)
        dk, dv = _backward_dkv_roles(*args)
    else:
        if dq is None:
            dq, _ = _backward_dq(*args)
        dk, dv = _backward_dkv(*args)
    return dq, dk, dv, None  # segment ids are integers: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def supports(q, k, v, *, causal=False, segment_ids=None, sliding_window=None,
             logit_softcap=None, scale=None) -> str | None:
    """None when ``mosaic_flash_attention`` handles this call, else the reason."""
    del causal, scale
    if not compat.is_hopper():
        return "the Mosaic GPU kernel needs a Hopper (sm_90) GPU"
    return _argument_problem(q, k, v, segment_ids, sliding_window, logit_softcap)


def _argument_problem(q, k, v, segment_ids, sliding_window, logit_softcap) -> str | None:
    if sliding_window is not None and sliding_window < 1:
        return f"sliding_window must be >= 1, got {sliding_window}"
    if logit_softcap is not None and not logit_softcap > 0:
        return f"logit_softcap must be > 0, got {logit_softcap}"
    if segment_ids is not None:
        if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
            return "segment_ids must be a pair (q ids [B,S], kv ids [B,T])"
        q_seg, kv_seg = segment_ids
        if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
            return (f"segment ids shapes {q_seg.shape}, {kv_seg.shape} must be [B,S] "
                    f"{q.shape[:2]} and [B,T] {k.shape[:2]}")
        if not (jnp.issubdtype(q_seg.dtype, jnp.integer)
                and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
            return f"segment ids must be integers; got {q_seg.dtype}, {kv_seg.dtype}"
    return _shape_problem(q, k, v)


def _shape_problem(q, k, v) -> str | None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        return f"expected q [B,S,H,D] and k, v [B,T,KH,D]; got {q.shape}, {k.shape}, {v.shape}"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"the Mosaic GPU kernel needs bfloat16 or float16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return f"head_dim must be one of {HEAD_DIMS}; got {q.shape[-1]}"
    if q.shape[0] != k.shape[0] or q.shape[2] % k.shape[2]:
        return f"batch or heads of q {q.shape} and k {k.shape} do not match (kv heads must divide heads)"
    return None


def _pad_to(x, axis, multiple, mode="constant"):
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, mode=mode)


def mosaic_flash_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None,
                           logit_softcap=None, scale=None,
                           block_sizes: tuning.BlockSizes | None = None):
    """Attention out [B,S,H,D] from the Hopper kernels, differentiable in q, k, v.

    segment_ids: None or a pair (q ids [B,S], kv ids [B,T]) of integers;
    block_sizes overrides the tuning table (see ``tuning.py``)."""
    problem = _argument_problem(q, k, v, segment_ids, sliding_window, logit_softcap)
    if problem:
        raise ValueError(problem)
    S, T, D = q.shape[1], k.shape[1], q.shape[-1]
    if block_sizes is None:
        block_sizes = tuning.block_sizes_for(compat.device_kind(), D, causal)
    if block_sizes.fused_dq and D not in (64, 128):
        raise ValueError(f"fused_dq needs head_dim 64 or 128 (dK, dV and dQ accumulators "
                         f"in registers); got head_dim={D}")
    for name in ("dq", "dkv"):  # head_dim 256's role-split kernels are sized for 64x64
        blocks = getattr(block_sizes, name)
        if D == 256 and (blocks.block_q, blocks.block_kv) != (64, 64):
            raise ValueError(f"head_dim 256's backward kernels take 64x64 blocks (shared memory "
                             f"and registers are full); got {name}={blocks}")
    spec = _Spec(q_len=S, kv_len=T, causal=bool(causal), window=sliding_window,
                 scale=float(D ** -0.5 if scale is None else scale), blocks=block_sizes,
                 softcap=None if logit_softcap is None else float(logit_softcap),
                 segments=segment_ids is not None)
    bs = block_sizes
    q_mult = math.lcm(_CONSUMERS * bs.fwd.block_q, _CONSUMERS * bs.dq.block_q, bs.dkv.block_q)
    kv_mult = math.lcm(bs.fwd.block_kv, bs.dq.block_kv, _CONSUMERS * bs.dkv.block_kv)
    # Padding repeats the last id: sorted ids stay sorted, so the segment spans
    # still narrow the block ranges (padded keys are masked, padded rows dropped).
    segs = None if segment_ids is None else (
        _pad_to(segment_ids[0].astype(jnp.int32), 1, q_mult, mode="edge"),
        _pad_to(segment_ids[1].astype(jnp.int32), 1, kv_mult, mode="edge"))
    out = _attention(_pad_to(q, 1, q_mult), _pad_to(k, 1, kv_mult), _pad_to(v, 1, kv_mult),
                     segs, spec)
    return out[:, :S]
