"""Hopper (sm_90) decode attention in Pallas Mosaic GPU (flash-decoding).

The (sequence, kv head) pairs' tiles of ``block_kv`` slots are laid end to
end, and each block walks one range of them (splits.Schedule): by default
one block per SM with equal ranges (stream-K), so the last wave is as full
as the others whatever the pair count; with num_splits, flash-decoding's
splits of each pair. A block runs three warpgroups: a producer that streams
its range's K and V tiles with TMA into a ring of shared-memory slots, and
two consumers that take the tiles in turn (the block's i-th tile to consumer
i % 2), each with its own online softmax. Where the range crosses into
another pair, each consumer writes its normalised partial output and
logsumexp for the pair it leaves (a fragment) and starts afresh; the
producer loads each fragment's queries into one of two buffers and streams
on without a pause. splits.merge combines the fragments in XLA.

The query rows of the kv head (G heads x T tokens, splits.query_rows) fill
the first R = G*T rows of a 64-row tile, the smallest wgmma M: both products
are wgmmas, S = Q K^T [64, block_kv] and O += P V [64, D]
(docs/design/decode-attention.md weighs this against FMA reductions). The
producer copies round_up(R, 8) rows straight from the queries' rows, [B*Hkv*R,
D] (a reshape of q at T = 1): rows past R hold the next heads' queries, or
zeros past the array's end (TMA), and rows past round_up(R, 8) are never
written. Every product keeps rows apart, and only the first round_up(R, 8)
rows are stored, so what the others hold never reaches the output; this
saves padding the queries to 64 rows in XLA, a kernel of its own (1.2-1.8 us
a call). Only the tiles holding a slot some query sees are streamed
(positions.visible_blocks); every visited tile is masked by the ring rule.

Paged caches: each tile's pages (one, or block_kv / page_size of them) are
copied by page id, read by the producer from the page table in GMEM
(clamped to the pool). Quantized caches (int8 / fp8 codes) stream their codes;
a consumer converts a tile's codes to the query's dtype into its own
shared-memory tile (wgmma's B operand must be in shared memory) and applies
the scales to the products: key scales to the logits' columns, value scales
to the probabilities' columns. The scales reach the kernel as one
[B, Hkv, C] float32 array per tensor, gathered and transposed in XLA (a TMA
copy cannot read one head's scales from the [tokens, heads] layout: its rows
would be 4 bytes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat, dispatch
from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention.mosaic_gpu.common import LOG2E, mma, mma_acc, vector, zeros
from pallas_kernels.attention.mosaic_gpu.rings import ring_steps
from pallas_kernels.decode_attention import splits as sp
from pallas_kernels.decode_attention.kv_formats import KIVI_TYPES, QuantizedKV
from pallas_kernels.decode_attention.positions import (query_position, slot_position, visible,
                                                       visible_blocks)
from pallas_kernels.shapes import cdiv, pad_to, round_up

ROWS = 64        # wgmma M: the kv head's query rows in the first R rows of the tile
CONSUMERS = 2
LSE_TILE = 32    # logsumexp entries are stored in multiples of 128 bytes (a TMA copy's unit)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
HEAD_DIMS = (64, 128)
DEFAULT_BLOCK_KV = 64
SMEM_SPARE = 1024  # barriers


def _smem(shape, dtype):
    """Shared memory [..., rows, minor]: 8-row tiles swizzled by the widest
    of 128/64/32 bytes that the minor dimension fills (TMA and wgmma layout)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(shape[-1] * itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


@dataclasses.dataclass(frozen=True)
class _Config:
    num_queries: int       # T
    group: int             # G
    kv_heads: int          # Hkv
    capacity: int          # C
    page_size: int | None  # None: contiguous
    block: int             # block_kv: slots a tile holds
    stages: int
    window: int | None
    softcap: float | None
    scale: float
    k_quant: bool
    v_quant: bool
    interpret: bool

    @property
    def copies(self):
        """TMA copies of one tensor's data per tile."""
        return 1 if self.page_size is None else max(1, self.block // self.page_size)


def unsupported(q, k, v, page_table, block_kv) -> str | None:
    """Why the Mosaic kernel cannot take this call (None if it can)."""
    if isinstance(k, KIVI_TYPES):
        return "KIVI-2 caches are read by 'blockspec' and 'xla' only"
    B, T, Hq, D = q.shape
    data = k.data if isinstance(k, QuantizedKV) else k
    if q.dtype not in DTYPES:
        return f"q has dtype {q.dtype}; the kernel takes bfloat16 or float16"
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, QuantizedKV) and x.dtype != q.dtype:
            return f"{name} has dtype {x.dtype}; an unquantized cache must have q's {q.dtype}"
    if D not in HEAD_DIMS:
        return f"head_dim={D} must be one of {HEAD_DIMS}"
    if T * (Hq // data.shape[2]) > ROWS:
        return (f"T * Hq / Hkv = {T * (Hq // data.shape[2])} query rows a kv head exceed the "
                f"{ROWS} rows of a tile")
    block = block_kv or DEFAULT_BLOCK_KV
    if block % 64 or block > 256:
        return f"block_kv={block} must be 64, 128, 192 or 256 (wgmma tiles)"
    if page_table is not None:
        ps = data.shape[1]
        if ps % 8 or (ps % block and block % ps):
            return (f"page_size={ps} must be a multiple of 8 that divides or is a multiple of "
                    f"block_kv={block}")
    elif data.shape[1] % 8:
        return f"cache length S={data.shape[1]} must be a multiple of 8 (TMA copies 8-row tiles)"
    if _stages(q, k, v, block) < 2:
        return f"block_kv={block} at head_dim={D} leaves no room for two ring stages"
    return None


def _tile_bytes(x, block, D):
    if isinstance(x, QuantizedKV):
        return block * D * x.data.dtype.itemsize + block * 4
    return block * D * x.dtype.itemsize


def _stages(q, k, v, block) -> int:
    """Ring stages (an even count, so each consumer owns whole slots) that
    fit beside two Q tiles, the consumers' output tiles and dequantization tiles."""
    D = q.shape[3]
    itemsize = q.dtype.itemsize
    fixed = 2 * ROWS * D * itemsize + CONSUMERS * ROWS * (D * 4 + 4) + SMEM_SPARE
    if any(isinstance(x, QuantizedKV) for x in (k, v)):
        fixed += CONSUMERS * block * D * itemsize  # each consumer's dequantized tile
    per_stage = _tile_bytes(k, block, D) + _tile_bytes(v, block, D)
    stages = (mc.SMEM_PER_BLOCK - fixed) // per_stage
    return min(4, stages - stages % 2)


def _logical_scales(x, page_table, padded: int):
    """A QuantizedKV's scales as [B, Hkv, padded] float32 in logical slot
    order (pages gathered), zero past the capacity."""
    scale = x.scale
    if page_table is not None:
        pages = jnp.clip(page_table, 0, scale.shape[0] - 1)
        scale = scale[pages].reshape(page_table.shape[0], -1, scale.shape[-1])
    return pad_to(scale.transpose(0, 2, 1), (scale.shape[0], scale.shape[2], padded))


def _dequantized(codes, dtype):
    """Codes in registers -> ``dtype`` (exact: int8 and e4m3 values fit)."""
    if codes.dtype == jnp.float8_e4m3fn and dtype == jnp.bfloat16:
        return codes.astype(jnp.float32).astype(dtype)  # no direct e4m3 -> bf16 conversion
    return codes.astype(dtype)


class _Fragment(NamedTuple):
    """One pair's part of a block's tile range: its sequence b, kv head h,
    length L, and the visible tiles it streams (``tile``)."""
    pair: jax.Array
    b: jax.Array
    h: jax.Array
    length: jax.Array
    first: jax.Array   # the first visible range's first tile
    n1: jax.Array      # tiles in the first range
    first2: jax.Array  # the second range's first tile
    count: jax.Array   # tiles streamed

    def tile(self, i):
        """The i-th streamed tile: the first range, then the second."""
        return jnp.where(i < self.n1, self.first + i, self.first2 + i - self.n1)


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The operations whose compiled form names register layouts or wgmma,
    and their plain forms for JAX's Mosaic GPU interpreter on CPU, which
    has neither (jax 0.10: no layout casts, no transposed or register wgmma
    operands)."""
    interpret: bool

    def set_max_registers(self, n, action):
        if not self.interpret:
            plgpu.set_max_registers(n, action=action)

    def iota(self, n, reduced_dim):
        if self.interpret:
            return lax.iota(jnp.int32, n)
        return plgpu.broadcasted_iota(jnp.int32, (n,), 0,
                                      layout=plgpu.Layout.WGMMA.reduce(reduced_dim))

    def vector(self, n, value, reduced_dim):
        if self.interpret:
            return jnp.full((n,), value, jnp.float32)
        return vector(n, value, reduced_dim)

    def zeros(self, shape):
        return jnp.zeros(shape, jnp.float32) if self.interpret else zeros(shape)

    def column_vector(self, ref):
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))

    def qk(self, q_tile, k_tile, shape):
        """Q K^T in float32, both tiles in shared memory."""
        if self.interpret:
            return jnp.dot(q_tile[...], k_tile[...].T, preferred_element_type=jnp.float32)
        return mma(q_tile, plgpu.transpose_ref(k_tile, (1, 0)), shape)

    def pv(self, acc, p, v_tile):
        """acc + P V, P in registers."""
        if self.interpret:
            return acc + jnp.dot(p, v_tile[...], preferred_element_type=jnp.float32)
        return mma_acc(acc, p, v_tile)


def _kernel(cfg: _Config, out_type, scratch, blocks: int):
    T, C, bk, stages, G = cfg.num_queries, cfg.capacity, cfg.block, cfg.stages, cfg.group
    tiles = cdiv(C, bk)
    ops = _Ops(cfg.interpret)

    def body(*refs):
        refs = list(refs)
        q_ref, k_ref = refs.pop(0), refs.pop(0)
        ks_ref = refs.pop(0) if cfg.k_quant else None
        v_ref = refs.pop(0)
        vs_ref = refs.pop(0) if cfg.v_quant else None
        lengths_ref, bounds_ref, first_fragment_ref = refs.pop(0), refs.pop(0), refs.pop(0)
        pages_ref = refs.pop(0) if cfg.page_size else None
        o_ref, lse_ref, q_smem, o_smem, k_smem, v_smem, *rest = refs
        # One dequantized tile a consumer serves K and then V: K's product
        # has completed (mma waits) before V's codes overwrite it.
        deq_smem = rest.pop(0) if cfg.k_quant or cfg.v_quant else None
        ks_smem = rest.pop(0) if cfg.k_quant else None
        vs_smem = rest.pop(0) if cfg.v_quant else None
        lse_smem, q_ready, q_free, k_ready, v_ready, k_free, v_free = rest
        kd_smem = deq_smem if cfg.k_quant else None
        vd_smem = deq_smem if cfg.v_quant else None

        block = lax.axis_index("block")
        wg = lax.axis_index("wg")
        lo, hi = bounds_ref[block], bounds_ref[block + 1]
        pair0 = lax.div(lo, tiles)
        n_fragments = lax.div(hi - 1, tiles) - pair0 + 1

        def fragment(f):
            pair = pair0 + f
            b = lax.div(pair, cfg.kv_heads)
            L = jnp.maximum(lengths_ref[b], 0)
            t0 = pair * tiles
            first, end, first2, end2 = visible_blocks(L, C, T, cfg.window, bk,
                                                      jnp.maximum(lo, t0) - t0,
                                                      jnp.minimum(hi, t0 + tiles) - t0)
            return _Fragment(pair, b, lax.rem(pair, cfg.kv_heads), L, first, end - first,
                             first2, end - first + end2 - first2)

        @pl.when(wg == CONSUMERS)
        def _producer():
            ops.set_max_registers(mc.PRODUCER_REGS, "decrease")
            r8 = o_ref.shape[3]

            def run(f, base):
                fr = fragment(f)
                buf = lax.rem(f, 2)

                @pl.when(f >= 2)
                def _():
                    plgpu.barrier_wait(q_free.at[buf])  # both consumers are done with fragment f - 2
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(fr.pair * T * G, r8)],
                                        q_smem.at[buf, pl.ds(0, r8)], q_ready.at[buf])

                def copy_tile(src, dst, barrier, tile):
                    if cfg.page_size is None:
                        plgpu.copy_gmem_to_smem(src.at[fr.b, pl.ds(tile * bk, bk), fr.h], dst,
                                                barrier)
                        return
                    rows = min(bk, cfg.page_size)
                    for c in range(cfg.copies):
                        slot0 = tile * bk + c * rows
                        j = jnp.minimum(lax.div(slot0, cfg.page_size), pages_ref.shape[1] - 1)
                        page = jnp.clip(pages_ref[fr.b, j], 0, src.shape[0] - 1)
                        plgpu.copy_gmem_to_smem(
                            src.at[page, pl.ds(lax.rem(slot0, cfg.page_size), rows), fr.h],
                            dst.at[pl.ds(c * rows, rows)], barrier)

                def issue(i, slot):
                    tile = fr.tile(i)
                    copy_tile(k_ref, k_smem.at[slot], k_ready.at[slot], tile)
                    if cfg.k_quant:
                        plgpu.copy_gmem_to_smem(ks_ref.at[fr.b, fr.h, pl.ds(tile * bk, bk)],
                                                ks_smem.at[slot], k_ready.at[slot])
                    copy_tile(v_ref, v_smem.at[slot], v_ready.at[slot], tile)
                    if cfg.v_quant:
                        plgpu.copy_gmem_to_smem(vs_ref.at[fr.b, fr.h, pl.ds(tile * bk, bk)],
                                                vs_smem.at[slot], v_ready.at[slot])
                ring_steps(base, fr.count, stages, issue, (k_free, v_free))
                return base + fr.count
            lax.fori_loop(0, n_fragments, run, jnp.int32(0))

        @pl.when(wg < CONSUMERS)
        def _consumer():
            ops.set_max_registers(mc.CONSUMER_REGS, "increase")
            shape = (ROWS, bk)
            D = q_smem.shape[2]
            # Positions as vectors along the rows and the columns of a tile,
            # broadcast only for the comparison (registers: the 2-D iotas
            # would live through the loop).
            rows = ops.iota(ROWS, 1)
            cols = ops.iota(bk, 0)

            def operand(data_smem, scale_smem, deq_smem, ready, free, slot):
                """A tile's K or V as a wgmma operand in shared memory, and its
                scales as a column vector (None unquantized); frees the ring
                slot where the tile has been read."""
                plgpu.barrier_wait(ready.at[slot])
                if deq_smem is None:
                    return data_smem.at[slot], None
                codes = data_smem.at[slot][...]
                scales = ops.column_vector(scale_smem.at[slot])
                plgpu.barrier_arrive(free.at[slot])
                deq_smem.at[wg][...] = _dequantized(codes, q_smem.dtype)
                plgpu.commit_smem()
                return deq_smem.at[wg], scales

            def run(f, base):
                fr = fragment(f)
                buf = lax.rem(f, 2)
                q_pos = mc.rows(query_position(fr.length, lax.div(rows, G), T), shape)
                # The block's streamed tiles alternate between the consumers
                # across fragments: this one's are first_mine, first_mine + 2, ...
                first_mine = base + lax.rem(base + wg, CONSUMERS)
                mine = lax.div(jnp.maximum(base + fr.count - first_mine + 1, 0), CONSUMERS)

                def step(j, carry):
                    acc, m, l = carry
                    i = first_mine + CONSUMERS * j
                    slot = lax.rem(i, stages)
                    k_tile, k_scales = operand(k_smem, ks_smem, kd_smem, k_ready, k_free, slot)
                    s = ops.qk(q_smem.at[buf], k_tile, shape)
                    if k_scales is None:
                        plgpu.barrier_arrive(k_free.at[slot])
                    else:
                        s = s * mc.cols(k_scales, shape)
                    s = s * cfg.scale
                    if cfg.softcap is not None:
                        s = jnp.tanh(s * (1.0 / cfg.softcap)) * cfg.softcap
                    slots = fr.tile(i - base) * bk + cols
                    # Slots past the capacity (a partial last tile) hold no position.
                    k_pos = jnp.where(slots < C, slot_position(fr.length, slots, C), -1)
                    s = jnp.where(visible(q_pos, mc.cols(k_pos, shape), cfg.window), s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1))
                    # Rows that have seen nothing keep m = -inf: shift by 0 so exp2 gives 0.
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) * LOG2E
                    p = jnp.exp2(s * LOG2E - mc.rows(m_use, shape))
                    alpha = jnp.exp2(m * LOG2E - m_use)
                    l = l * alpha + p.sum(axis=1)
                    v_tile, v_scales = operand(v_smem, vs_smem, vd_smem, v_ready, v_free, slot)
                    if v_scales is not None:
                        p = p * mc.cols(v_scales, shape)
                    acc = ops.pv(acc * mc.rows(alpha, acc.shape), p.astype(q_smem.dtype), v_tile)
                    if v_scales is None:
                        plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                plgpu.barrier_wait(q_ready.at[buf])
                carry = (ops.zeros((ROWS, D)), ops.vector(ROWS, -jnp.inf, 1),
                         ops.vector(ROWS, 0.0, 1))
                acc, m, l = lax.fori_loop(0, mine, step, carry)
                plgpu.barrier_arrive(q_free.at[buf])
                empty = l == 0.0
                l_safe = jnp.where(empty, 1.0, l)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last fragment's stores have read
                o_smem.at[wg][...] = acc * mc.rows(1.0 / l_safe, acc.shape)
                lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
                plgpu.commit_smem()
                k = jnp.where(f == 0, first_fragment_ref[block], 0)
                plgpu.copy_smem_to_gmem(o_smem.at[wg, pl.ds(0, o_ref.shape[3])],
                                        o_ref.at[fr.pair, k, wg])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg, pl.ds(0, lse_ref.shape[3])],
                                        lse_ref.at[fr.pair, k, wg])
                return base + fr.count
            lax.fori_loop(0, n_fragments, run, jnp.int32(0))
            mc.wait_stores_before_exit()

    extra = dict(interpret=compat.mosaic_gpu_interpret_params()) if cfg.interpret else {}
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(blocks,),
                        grid_names=("block",), num_threads=CONSUMERS + 1, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(
                            approx_math=True,
                            # The row reductions of WGMMA tiles stay in a warp: no
                            # scratch (the 2 KiB default would not fit beside two Q tiles).
                            reduction_scratch_bytes=0), **extra)


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "scale",
                                             "block_kv", "num_splits", "num_blocks", "interpret"))
def mosaic_decode_attention(q, k, v, lengths, page_table=None, *, sliding_window=None,
                            logit_softcap=None, scale=None, block_kv=None, num_splits=None,
                            num_blocks=None, interpret=False):
    """Decode attention (see reference.py) by the Hopper kernel; arguments as
    checked by api.decode_attention and accepted by ``unsupported``.

    block_kv: slots a tile holds. The blocks walk the (sequence, kv head)
    pairs' tiles laid end to end (splits.Schedule): ``num_blocks`` equal
    ranges (None: one block per SM), or with ``num_splits`` each pair's
    tiles cut into that many splits, a block each. interpret: run in JAX's
    Mosaic GPU interpreter (CPU tests)."""
    why = unsupported(q, k, v, page_table, block_kv)
    if why:
        raise ValueError(f"the Mosaic GPU decode kernel cannot run this call: {why}")
    if num_splits is not None and num_blocks is not None:
        raise ValueError(f"num_splits={num_splits} and num_blocks={num_blocks}: give one")
    if num_blocks is not None:
        dispatch.check_size("num_blocks", num_blocks)
    B, T, Hq, D = q.shape
    data = k.data if isinstance(k, QuantizedKV) else k
    Hkv = data.shape[2]
    G = Hq // Hkv
    bk = block_kv or DEFAULT_BLOCK_KV
    paged = page_table is not None
    capacity = page_table.shape[1] * data.shape[1] if paged else data.shape[1]
    tiles = cdiv(capacity, bk)
    if num_splits is not None:
        schedule = sp.Schedule.splits(B * Hkv, tiles, num_splits)
    else:
        schedule = sp.Schedule.balanced(B * Hkv, tiles, num_blocks or compat.sm_count())
    stages = _stages(q, k, v, bk)
    cfg = _Config(num_queries=T, group=G, kv_heads=Hkv, capacity=capacity,
                  page_size=data.shape[1] if paged else None, block=bk, stages=stages,
                  window=sliding_window, softcap=logit_softcap,
                  scale=D ** -0.5 if scale is None else float(scale),
                  k_quant=isinstance(k, QuantizedKV), v_quant=isinstance(v, QuantizedKV),
                  interpret=interpret)
    r8 = round_up(T * G, 8)
    fragments = schedule.valid.shape[1]
    out_type = (jax.ShapeDtypeStruct((B * Hkv, fragments, CONSUMERS, r8, D), jnp.float32),
                jax.ShapeDtypeStruct((B * Hkv, fragments, CONSUMERS, round_up(r8, LSE_TILE)),
                                     jnp.float32))

    def ring(x):
        dtype = x.data.dtype if isinstance(x, QuantizedKV) else x.dtype
        return _smem((stages, bk, D), dtype)
    quantized = [x for x in (k, v) if isinstance(x, QuantizedKV)]
    # The swizzled buffers first: each starts at a 1024-byte boundary, so a
    # small buffer or a barrier between two of them would waste the rest of one.
    scratch = [
        _smem((2, ROWS, D), q.dtype),  # fragment f's queries in buffer f % 2
        _smem((CONSUMERS, ROWS, D), jnp.float32),
        ring(k), ring(v),
        *[_smem((CONSUMERS, bk, D), q.dtype) for _ in quantized[:1]],  # dequantized tiles
        *[plgpu.SMEM((stages, bk), jnp.float32) for _ in quantized],  # scales
        plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
        plgpu.Barrier(num_arrivals=1, num_barriers=2),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=2),
        plgpu.Barrier(num_arrivals=cfg.copies + int(cfg.k_quant), num_barriers=stages),
        plgpu.Barrier(num_arrivals=cfg.copies + int(cfg.v_quant), num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    ]
    padded = tiles * bk
    rows = sp.query_rows(q, Hkv, T * G).reshape(B * Hkv * T * G, D)
    # TMA's 8-row tiles need the GMEM rows a multiple of 8 (B*Hq is, at T = 1,
    # when Hq is a multiple of 8: no pad then). A copy running past them reads
    # zeros on a GPU; the interpreter reads garbage, so it gets whole tiles.
    last = (B * Hkv - 1) * T * G + r8 if interpret else rows.shape[0]
    inputs = [pad_to(rows, (round_up(last, 8), D))]

    def slots(cache):
        """A cache as the kernel reads it: whole tiles under the interpreter."""
        return cache if paged or not interpret else pad_to(cache, (B, padded, Hkv, D))
    for x in (k, v):
        inputs += ([slots(x.data), _logical_scales(x, page_table, padded)]
                   if isinstance(x, QuantizedKV) else [slots(x)])
    inputs += [lengths, jnp.asarray(schedule.bounds, jnp.int32),
               jnp.asarray(schedule.first_fragment)]
    if paged:
        inputs.append(page_table)
    out, lse = _kernel(cfg, out_type, scratch, schedule.blocks)(*inputs)
    parts = fragments * CONSUMERS
    valid = jnp.repeat(jnp.asarray(schedule.valid), CONSUMERS, axis=1).reshape(B, Hkv, parts)
    return sp.merge_query_rows(out.reshape(B, Hkv, parts, r8, D),
                               lse.reshape(B, Hkv, parts, -1), T, Hq, q.dtype, valid)
