"""Hopper (sm_90) quantised matmuls in Pallas Mosaic GPU: w8a8 int8 and fp8
e4m3 with DeepSeek-style block scales (layouts as in reference.py).

One persistent kernel shape serves both. Each block (one per SM) walks its
share of the output tiles in M-grouped order (neighbouring blocks reuse the
same weight columns from L2) and runs three warpgroups:

* a producer that streams the tile's K steps (128 bytes of K each, the
  swizzle width of 8-bit operands) with TMA into a ring of shared-memory
  slots, running ahead across tile boundaries;
* two consumers, each owning half of the tile's rows, issuing wgmma on 8-bit
  operands that are both K-major (as Hopper requires for 8-bit types: the
  weights are stored [N, K]).

w8a8: the int32 accumulator stays in registers for the whole K walk, with one
wgmma in flight while the previous slot is handed back; the per-token and
per-channel scales are applied once, in the epilogue.

fp8 blockwise: every K step is one 128-wide scale block. A tile's columns are
whole 128-wide weight-scale blocks (the wide tile has two); each block's
wgmma goes into a fresh float32 partial accumulator, which is then promoted
into that block's float32 accumulator times the activation scales (one per
row, TMA'd with the operands) and the block's weight scale (a scalar). This
keeps the tensor core's limited-precision fp8 accumulation to 128 products,
as in DeepSeek-V3. A 256-column tile halves the activation traffic per
product (faster than 128 columns at large outputs). The kernel is
register-bound, so the step's x rows are the wgmma's A operand from
registers, loaded once for both blocks. ptxas spills 16 bytes that way,
against 188 when each block's wgmma reads them from shared memory, and the
kernel runs about 4% faster (docs/design/quant-matmul-hopper.md).

The epilogue writes the tile through shared memory with a TMA store that
overlaps the next tile's K walk. TMA zero-fills out-of-bounds loads and clips
out-of-bounds stores, so partial M and N tiles need no padding; K is padded
to the 128-byte step (zeros add nothing) and N to 64 (TMA row alignment).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels import mosaic_common as mc
from pallas_kernels.quant_matmul.reference import FP8_BLOCK
from pallas_kernels.shapes import cdiv, pad_to, round_up

STEP_K = 128                 # K elements per pipeline step (128 bytes of 8-bit codes)
CONSUMERS = 2
SMEM_BYTES = mc.SMEM_PER_BLOCK
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class Tiling(NamedTuple):
    """Output tile (tm rows split between the two consumers, tn columns), ring
    depth, and how many M tiles one group of the raster order spans."""
    tm: int
    tn: int
    stages: int
    group_m: int = 8


# The default tile for both kinds where there is work enough (see default_tiling).
WIDE_TILING = Tiling(128, 256, 3)
# The tile for small outputs, and where a float32 output's staging tile leaves
# the wide one too little shared memory; 4 stages measured best on the H200.
SMALL_TILING = Tiling(128, 128, 4)
# The wide tile only where it gives every SM this many tiles: with fewer, its
# half-empty last wave (or idle SMs) costs more than its per-tile efficiency
# gains (12 model-like shapes on the H200, docs/design/quant-matmul-hopper.md).
WIDE_MIN_WAVES = 2


def check_tiling(tiling: Tiling, kind: str, out_dtype) -> None:
    tm, tn, stages, group_m = tiling
    tmc = tm // CONSUMERS
    if tm % (64 * CONSUMERS) or tmc > 128:
        raise ValueError(f"tiling tm={tm} must be 128 or 256 (64 or 128 rows per consumer)")
    if tn % 64 or not 64 <= tn <= 256:
        raise ValueError(f"tiling tn={tn} must be a multiple of 64 in [64, 256]")
    if kind == "fp8" and tn % FP8_BLOCK:
        raise ValueError(f"fp8 blockwise tiling tn={tn} must be a multiple of {FP8_BLOCK}, "
                         f"whole weight-scale blocks (each is promoted with its own scale)")
    # per thread, float32/int32: the tile's accumulator, and for fp8 one
    # weight-scale block's partial product beside it
    acc_regs = tmc * tn // 128 + (tmc * FP8_BLOCK // 128 if kind == "fp8" else 0)
    # fp8's promotion math needs few other registers; 192 measured fine
    limit = 192 if kind == "fp8" else 128
    if acc_regs > limit:
        raise ValueError(f"tiling {tuple(tiling)} needs {acc_regs} accumulator registers per "
                         f"thread; at most {limit} fit")
    if stages < 2 or group_m < 1:
        raise ValueError(f"tiling needs stages >= 2 and group_m >= 1, got {tuple(tiling)}")
    need = _smem_bytes(tiling, kind, out_dtype)
    if need > SMEM_BYTES:
        raise ValueError(f"tiling {tuple(tiling)} needs {need} bytes of shared memory "
                         f"(limit {SMEM_BYTES}); use fewer stages or a smaller tile")


def _smem_bytes(tiling, kind, out_dtype):
    tm, tn, stages, _ = tiling
    per_stage = (tm + tn) * STEP_K + (tm * 4 if kind == "fp8" else 0)
    epilogue = tm * tn * jnp.dtype(out_dtype).itemsize + (tm + CONSUMERS * tn) * 4
    return stages * per_stage + epilogue + 1024  # barriers and alignment


def default_tiling(kind: str, out_dtype, m: int, n: int) -> Tiling:
    """The default tile for an [m, n] output: the wide tile where it makes at
    least WIDE_MIN_WAVES tiles per SM, else 128x128; each with as many ring
    stages as fit next to the epilogue's staging tile (a float32 output leaves
    room for fewer)."""
    wide_tiles = cdiv(m, WIDE_TILING.tm) * cdiv(n, WIDE_TILING.tn)
    wide_enough = wide_tiles >= WIDE_MIN_WAVES * compat.sm_count()
    for tile in ((WIDE_TILING,) if wide_enough else ()) + (SMALL_TILING,):
        for stages in range(tile.stages, 1, -1):
            tiling = tile._replace(stages=stages)
            if _smem_bytes(tiling, kind, out_dtype) <= SMEM_BYTES:
                return tiling
    raise AssertionError("the 128x128 two-stage tiling always fits")


def tile_coords(t, m_tiles, n_tiles, group_m):
    """Output tile t -> (m, n) in M-grouped order: groups of group_m M tiles
    are walked column by column, so blocks running at once share weights."""
    per_group = group_m * n_tiles
    first_m = (t // per_group) * group_m
    rows = jnp.minimum(m_tiles - first_m, group_m)
    r = t % per_group
    return first_m + r % rows, r // rows


def _num_programs(tiles: int) -> int:
    return min(compat.sm_count(), tiles)


def _matmul(x, w, row_scales, col_scales, *, kind, tiling, out_dtype):
    """The shared kernel. x [M, Kp], w [Np, Kp] (8-bit, K padded to STEP_K,
    N to 64). w8a8: row_scales xs [Mt] and col_scales ws [Nt] (padded to whole
    tiles). fp8: row_scales xs^T [nk, Mt], col_scales ws [ceil(Np/128), nk]."""
    tm, tn, stages, group_m = tiling
    tmc = tm // CONSUMERS
    M, K = x.shape
    N = w.shape[0]
    m_tiles, n_tiles, k_steps = cdiv(M, tm), cdiv(N, tn), K // STEP_K
    tiles = m_tiles * n_tiles
    programs = _num_programs(tiles)
    fp8 = kind == "fp8"
    acc_dtype = jnp.float32 if fp8 else jnp.int32
    parts = tn // FP8_BLOCK if fp8 else 1  # column blocks, each with its own weight scale
    pn = tn // parts

    def body(x_ref, w_ref, rs_ref, cs_ref, out_ref, a_smem, b_smem, *rest):
        # fp8: per-step activation scales; int8: epilogue scales and their barrier.
        if fp8:
            sx_smem, out_smem, ready, free = rest
        else:
            xs_smem, ws_smem, out_smem, ready, free, scales_ready = rest
        sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
        my_tiles = (tiles - 1 - sm) // programs + 1

        def coords(i):
            return tile_coords(sm + i * programs, m_tiles, n_tiles, group_m)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(mc.PRODUCER_REGS, action="decrease")

            @pl.loop(0, my_tiles * k_steps)
            def _(g):
                m, n = coords(g // k_steps)
                k = g % k_steps
                slot = g % stages

                @pl.when(g >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])
                cols = pl.ds(k * STEP_K, STEP_K)
                for c in range(CONSUMERS):
                    rows = pl.ds(m * tm + c * tmc, tmc)
                    plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], a_smem.at[slot, c],
                                            ready.at[slot])
                    if fp8:
                        plgpu.copy_gmem_to_smem(rs_ref.at[k, rows], sx_smem.at[slot, c],
                                                ready.at[slot])
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(n * tn, tn), cols], b_smem.at[slot],
                                        ready.at[slot])

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(mc.CONSUMER_REGS, action="increase")
            row_layout = plgpu.Layout.WGMMA.reduce(1)

            @pl.loop(0, my_tiles)
            def _(i):
                m, n = coords(i)
                row0 = m * tm + wg * tmc
                first = i * k_steps  # global step of this tile's first K step
                if not fp8:  # epilogue scales, fetched while the K walk runs
                    plgpu.copy_gmem_to_smem(rs_ref.at[pl.ds(row0, tmc)], xs_smem.at[wg],
                                            scales_ready.at[wg])
                    plgpu.copy_gmem_to_smem(cs_ref.at[pl.ds(n * tn, tn)], ws_smem.at[wg],
                                            scales_ready.at[wg])

                def w_operand(slot, w_cols=None):
                    """The step's weight tile (or its columns w_cols), transposed
                    to K-major."""
                    w_tile = b_smem.at[slot] if w_cols is None else b_smem.at[slot, w_cols]
                    return plgpu.transpose_ref(w_tile, (1, 0))

                if fp8:
                    def w_scales(k):
                        return tuple(cs_ref[n * parts + c, k] for c in range(parts))

                    def step(k, carry):
                        accs, w_scale = carry
                        slot = (first + k) % stages
                        # The next step's weight scales, loaded a step ahead.
                        next_w_scale = w_scales(jnp.minimum(k + 1, k_steps - 1))
                        plgpu.barrier_wait(ready.at[slot])
                        x_scale = plgpu.load(sx_smem.at[slot, wg], (), layout=row_layout)
                        # This consumer's x rows, in registers once for all the
                        # tile's scale blocks (see the module docstring).
                        x_regs = plgpu.load(a_smem.at[slot, wg], (), layout=plgpu.Layout.WGMMA_8BIT)
                        new = []
                        for c in range(parts):
                            def block(part_ref):
                                plgpu.wgmma(part_ref, x_regs, w_operand(slot, pl.ds(c * pn, pn)))
                                return part_ref[...]
                            part = pl.run_scoped(block, plgpu.ACC((tmc, pn), jnp.float32))
                            new.append(accs[c] + part * mc.rows(x_scale * w_scale[c], part.shape))
                        plgpu.barrier_arrive(free.at[slot])
                        return tuple(new), next_w_scale

                    zeros = plgpu.layout_cast(jnp.zeros((tmc, pn), jnp.float32),
                                              plgpu.Layout.WGMMA)
                    ys, _ = lax.fori_loop(0, k_steps, step, ((zeros,) * parts, w_scales(0)))
                else:
                    def walk(acc_ref):
                        @pl.loop(0, k_steps)
                        def _(k):
                            slot = (first + k) % stages
                            plgpu.barrier_wait(ready.at[slot])
                            plgpu.wgmma(acc_ref, a_smem.at[slot, wg], w_operand(slot))
                            plgpu.wgmma_wait(1)  # the previous step's product is done

                            @pl.when(k > 0)
                            def _():
                                plgpu.barrier_arrive(free.at[(first + k - 1) % stages])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(free.at[(first + k_steps - 1) % stages])
                        return acc_ref[...]
                    acc = pl.run_scoped(walk, plgpu.ACC((tmc, tn), acc_dtype))
                    plgpu.barrier_wait(scales_ready.at[wg])
                    x_scale = plgpu.load(xs_smem.at[wg], (), layout=row_layout)
                    w_scale = plgpu.load(ws_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    ys = (acc.astype(jnp.float32) * mc.rows(x_scale, acc.shape)
                          * mc.cols(w_scale, acc.shape),)

                # The previous tile's store may still be reading out_smem.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for c, y in enumerate(ys):
                    out_smem.at[wg * parts + c][...] = y.astype(out_dtype)
                plgpu.commit_smem()
                for c in range(parts):
                    plgpu.copy_smem_to_gmem(out_smem.at[wg * parts + c], out_ref.at[
                        pl.ds(row0, tmc), pl.ds(n * tn + c * pn, pn)])

            plgpu.wait_smem_to_gmem(0)

    in_dtype = x.dtype
    scratch = [mc.swizzled_smem((stages, CONSUMERS, tmc, STEP_K), in_dtype),
               mc.swizzled_smem((stages, tn, STEP_K), in_dtype)]
    per_step_copies = CONSUMERS + 1
    if fp8:
        scratch.append(plgpu.SMEM((stages, CONSUMERS, tmc), jnp.float32))
        per_step_copies += CONSUMERS
    else:
        scratch += [plgpu.SMEM((CONSUMERS, tmc), jnp.float32),
                    plgpu.SMEM((CONSUMERS, tn), jnp.float32)]
    scratch += [mc.swizzled_smem((CONSUMERS * parts, tmc, pn), out_dtype),
                plgpu.Barrier(num_arrivals=per_step_copies, num_barriers=stages),
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages)]
    if not fp8:
        scratch.append(plgpu.Barrier(num_arrivals=2, num_barriers=CONSUMERS))
    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
                          scratch_types=scratch, grid=(programs,), grid_names=("sm",),
                          num_threads=CONSUMERS + 1, thread_name="wg",
                          compiler_params=plgpu.CompilerParams())
    return kernel(x, w, row_scales, col_scales)


def _check_out_dtype(out_dtype):
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"out_dtype {jnp.dtype(out_dtype).name} is not supported by the Mosaic "
                         f"GPU kernels; use one of {[jnp.dtype(d).name for d in OUT_DTYPES]}")


def _pad_operands(xq, wq):
    """Pad K to the step and N to 64 (TMA row alignment), rows of x to 8."""
    M, K = xq.shape
    N = wq.shape[0]
    Kp = round_up(K, STEP_K)
    return pad_to(xq, (round_up(M, 8), Kp)), pad_to(wq, (round_up(N, 64), Kp))


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling"))
def w8a8_mosaic(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, tiling: Tiling | None = None):
    """int8 xq [M, K] with per-token scales xs [M], int8 wq [N, K] with
    per-channel scales ws [N] -> [M, N] (see reference.w8a8_reference)."""
    _check_out_dtype(out_dtype)
    M, N = xq.shape[0], wq.shape[0]
    tiling = default_tiling("int8", out_dtype, M, N) if tiling is None else Tiling(*tiling)
    check_tiling(tiling, "int8", out_dtype)
    x, w = _pad_operands(xq, wq)
    xs = pad_to(xs.astype(jnp.float32), (round_up(x.shape[0], tiling.tm),))
    ws = pad_to(ws.astype(jnp.float32), (round_up(w.shape[0], tiling.tn),))
    out = _matmul(x, w, xs, ws, kind="int8", tiling=tiling, out_dtype=out_dtype)
    return out[:M, :N]


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling"))
def fp8_blockwise_mosaic(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16,
                         tiling: Tiling | None = None):
    """e4m3 xq [M, K] with 1x128 scales xs [M, ceil(K/128)], e4m3 wq [N, K]
    with 128x128 scales ws [ceil(N/128), ceil(K/128)] -> [M, N] (see
    reference.fp8_blockwise_reference)."""
    _check_out_dtype(out_dtype)
    M, N = xq.shape[0], wq.shape[0]
    tiling = default_tiling("fp8", out_dtype, M, N) if tiling is None else Tiling(*tiling)
    check_tiling(tiling, "fp8", out_dtype)
    x, w = _pad_operands(xq, wq)
    nk = x.shape[1] // STEP_K
    # Scales of row tiles are TMA'd per K step: store them K-block-major.
    xs_t = pad_to(xs.astype(jnp.float32).T, (nk, round_up(x.shape[0], tiling.tm)))
    ws = pad_to(ws.astype(jnp.float32), (round_up(w.shape[0], tiling.tn) // FP8_BLOCK, nk))
    out = _matmul(x, w, xs_t, ws, kind="fp8", tiling=tiling, out_dtype=out_dtype)
    return out[:M, :N]
