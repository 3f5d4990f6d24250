"""Hopper (sm_90) grouped-matmul kernels in Pallas Mosaic GPU: TMA loads into a
multi-stage shared-memory pipeline feeding wgmma, float32 accumulators in
registers, and a persistent grid (one program per SM walking the work list).

gmm: one work item per (schedule step, N tile). Its row tile is multiplied
in full by the step's expert matrix, then only the step's rows [lo, hi) are
stored. The row count is dynamic but a TMA store needs a static shape, so the
rows go out as a sum of power-of-two row blocks (one static TMA shape per
power of two, each issued only when its bit is set in hi - lo). The zero tail
(rows past sum(group_sizes)) stores the untouched zero accumulator.

tgmm: one work item per (group, K tile, N tile); the pipeline walks the
group's row tiles and zeroes, in shared memory, the rows of the first and last
tile that belong to neighbouring groups before the wgmma consumes them.

Shapes: partial row, K and N tiles are fine (TMA zero-fills out-of-bounds
loads and clips out-of-bounds stores; a one-row store, which Mosaic issues as
a plain bulk copy clipped only at the buffer's end, is cut to the partial
tile's columns by store_rows), but Mosaic's swizzled TMA wants each
operand's minor dimension to be a multiple of 64 and its major one a multiple
of 8, so misaligned operands are zero-padded first (a copy: a slow path).
Inputs must be bfloat16 or float16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels import mosaic_common as mc
from pallas_kernels.grouped_matmul.schedule import make_schedule, num_steps
from pallas_kernels.shapes import pad_axis_to_multiple

DTYPES = (jnp.bfloat16, jnp.float16)
DEFAULT_TILING = (128, 64, 128)        # gmm: (rows, K, N) per work item
DEFAULT_TGMM_TILING = (64, 128, 128)   # tgmm: (rows, K, N); best of a sweep on H100
SMEM_BYTES = mc.SMEM_PER_BLOCK - 7 * 1024  # slack below the block limit


def programs(interpret) -> int:
    """Programs of a persistent launch: one per SM, or two under the GPU
    interpreter (enough to exercise the strided work split, and fast)."""
    return 2 if interpret else compat.sm_count()


def launch(body, out_type, scratch, interpret, **threads):
    """Persistent launch (``programs``) on the grid axis "sm". The scratch's
    output staging tile is reused by every work item; its TMA store overlaps
    the next item's pipeline. ``threads``: plgpu.kernel's num_threads and
    thread_name, for a kernel of several warpgroups."""
    extra = dict(interpret=compat.mosaic_gpu_interpret_params()) if interpret else {}
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                        grid=(programs(interpret),), grid_names=("sm",),
                        compiler_params=_params(), **threads, **extra)


def store_rows(smem, dst, lo, hi, offset, max_rows, last_cols=None):
    """TMA-store rows [offset, offset + hi - lo) of the staging tile ``smem``
    to ``dst(offset, rows, cols)`` (a GMEM ref of ``rows`` rows and ``cols``
    columns). The row count is dynamic but a TMA store needs a static shape,
    so the rows go out as a sum of power-of-two row blocks of at most
    ``max_rows`` rows, each issued only when its bit is set in hi - lo.

    last_cols: (is the last N tile, its width) when the last N tile is
    partial. A one-row store is contiguous in GMEM, and Mosaic issues it as a
    plain bulk copy clipped at the buffer's end only, not the row's: in a
    partial N tile it would run on into the next row's first columns (another
    item's rows, so its stores race with this one). There the row stores only
    the tile's columns that exist."""
    width = smem.shape[1]

    def copy(when, offset, rows, cols):
        src = smem.at[pl.ds(offset, rows)] if cols == width else \
            smem.at[pl.ds(offset, rows), pl.ds(0, cols)]
        pl.when(when)(lambda: plgpu.copy_smem_to_gmem(src, dst(offset, rows, cols)))

    for rows in [1 << b for b in reversed(range(max_rows.bit_length()))]:
        bit = (hi - lo) & rows
        if rows == 1 and last_cols is not None:
            is_last, cols = last_cols
            copy((bit != 0) & jnp.logical_not(is_last), offset, 1, width)
            copy((bit != 0) & is_last, offset, 1, cols)
        else:
            copy(bit != 0, offset, rows, width)
        offset = offset + bit


def last_tile_cols(j, n, tn):
    """store_rows' last_cols for N tile j of tn columns in rows n wide: None
    when n is a multiple of tn (every tile whole)."""
    last = pl.cdiv(n, tn) - 1
    cols = n - last * tn
    return None if cols == tn else (j == last, cols)


def group_tiles(group_sizes, m, tr):
    """tgmm's row walk: each group's first and end row, its first row tile of
    tr rows and how many tiles hold its rows (0 for an empty group)."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first_tile = starts // tr
    tile_count = jnp.where(ends > starts, pl.cdiv(ends, tr) - first_tile, 0)
    return starts, ends, first_tile, tile_count


def zero_other_groups(lhs_smem, row0, start, end):
    """Zero, in shared memory, the rows of an lhs tile (first row row0) that
    lie outside the group's rows [start, end). Zeroing one operand suffices
    if the other is finite there: it holds rows of other groups or TMA's
    zero fill past M."""
    rows = row0 + plgpu.layout_cast(
        jax.lax.broadcasted_iota(jnp.int32, lhs_smem.shape, 0), plgpu.Layout.WGMMA)
    keep = (rows >= start) & (rows < end)
    lhs_smem[...] = jnp.where(keep, lhs_smem[...], 0).astype(lhs_smem.dtype)
    plgpu.commit_smem()


def unsupported(dtype, tiling=None) -> str | None:
    """Why the kernels cannot take inputs of this dtype with this tiling
    (None: the default), or None when they can."""
    if dtype not in DTYPES:
        return (f"needs bfloat16 or float16 inputs; got {dtype} (use implementation='xla' or "
                f"'ragged_dot' for float32)")
    if tiling is not None and any(t % 64 for t in tiling):
        return f"tiling (rows, contraction, columns) must be multiples of 64; got {tiling}"
    return None


def check(lhs, other, tiling):
    if other.dtype != lhs.dtype:
        raise ValueError(f"the Mosaic GPU kernel needs inputs of one dtype; got {lhs.dtype} and "
                         f"{other.dtype}")
    problem = unsupported(lhs.dtype, tiling)
    if problem:
        raise ValueError(f"the Mosaic GPU kernel {problem}")


def stages(tiling, out_bytes, budget=SMEM_BYTES):
    """Ring depth for (rows, K, N) tiles: as many (at most 4) as fit beside
    the output staging tile in ``budget`` bytes."""
    tm, tk, tn = tiling
    per_stage = (tm * tk + tk * tn) * 2
    stages = min(4, (budget - tm * tn * out_bytes) // per_stage)
    if stages < 2:
        raise ValueError(f"tiling {tiling} does not fit in shared memory")
    return stages


def _params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def aligned(x):
    """x zero-padded for swizzled TMA: its minor dimension to a multiple of 64,
    the one before to a multiple of 8 (rhs [G, K, N]: both to 64)."""
    return pad_axis_to_multiple(pad_axis_to_multiple(x, x.ndim - 2, 8 if x.ndim == 2 else 64),
                                x.ndim - 1, 64)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype, tiling=DEFAULT_TILING,
         interpret=False):
    check(lhs, rhs, tiling)
    m, n = lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs, rhs = aligned(lhs), aligned(rhs)
    (m_pad, k), g = lhs.shape, rhs.shape[0]
    n_pad = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    depth = stages(tiling, jnp.dtype(out_dtype).itemsize)
    n_tiles, k_tiles = pl.cdiv(n_pad, tn), pl.cdiv(k, tk)
    items = num_steps(m_pad, tm, g + 1) * n_tiles
    sched = make_schedule(group_sizes, m_pad, tm, zero_tail=True)

    def grouped_matmul(group_ref, tile_ref, lo_ref, hi_ref, first_ref, lhs_ref, rhs_ref,
                       out_ref, out_smem):
        del first_ref  # each step stores only its own rows

        @plgpu.nd_loop((items,), collective_axes="sm")
        def _item(info):
            s = info.index[0] // n_tiles
            j = info.index[0] % n_tiles
            group, tile, lo, hi = group_ref[s], tile_ref[s], lo_ref[s], hi_ref[s]

            def mma(_, lhs_smem, rhs_smem, acc_ref):
                plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.transpose((1, 0)) if transpose_rhs
                            else rhs_smem)
                return acc_ref

            def accumulate(acc_ref):
                @pl.when(group < g)  # group g is the zero tail: keep the zero accumulator
                def _():
                    plgpu.emit_pipeline(
                        lambda idx, a, b: mma(idx, a, b, acc_ref),
                        grid=(k_tiles,),
                        in_specs=[
                            plgpu.BlockSpec((tm, tk), lambda kk: (tile, kk), delay_release=1),
                            plgpu.BlockSpec((tn, tk) if transpose_rhs else (tk, tn),
                                            (lambda kk: (j, kk)) if transpose_rhs
                                            else (lambda kk: (kk, j)), delay_release=1),
                        ],
                        max_concurrent_steps=depth,
                    )(lhs_ref, rhs_ref.at[group])
                return acc_ref[...]

            @pl.when(hi > lo)
            def _():
                acc = pl.run_scoped(accumulate, plgpu.ACC((tm, tn)))
                # The previous item's stores may still be reading out_smem.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                store_rows(out_smem, lambda offset, rows, cols: out_ref.at[
                    pl.ds(tile * tm + offset, rows), pl.ds(j * tn, cols)], lo, hi, lo - tile * tm,
                    tm, last_tile_cols(j, n_pad, tn))

        plgpu.wait_smem_to_gmem(0)

    out = launch(grouped_matmul, jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
                 [plgpu.SMEM((tm, tn), out_dtype)], interpret)(*sched, lhs, rhs)
    return out[:m, :n]


def tgmm(lhs, dout, group_sizes, *, out_dtype, tiling=DEFAULT_TGMM_TILING,
         interpret=False):
    """out[g] = lhs[rows_g]^T @ dout[rows_g]. tiling = (row tile, K tile, N tile)."""
    check(lhs, dout, tiling)
    (m, k), n, g = lhs.shape, dout.shape[1], group_sizes.shape[0]
    lhs, dout = aligned(lhs), aligned(dout)
    k_pad, n_pad = lhs.shape[1], dout.shape[1]
    tr, tk, tn = tiling
    depth = stages((tk, tr, tn), jnp.dtype(out_dtype).itemsize)
    k_tiles, n_tiles = pl.cdiv(k_pad, tk), pl.cdiv(n_pad, tn)
    starts, ends, first_tile, tile_count = group_tiles(group_sizes, m, tr)

    def transposed_grouped_matmul(start_ref, end_ref, first_ref, count_ref, lhs_ref, dout_ref,
                                  out_ref, out_smem):
        @plgpu.nd_loop((g * k_tiles * n_tiles,), collective_axes="sm")
        def _item(info):
            grp = info.index[0] // (k_tiles * n_tiles)
            ki = info.index[0] // n_tiles % k_tiles
            ni = info.index[0] % n_tiles
            start, end = start_ref[grp], end_ref[grp]
            first, count = first_ref[grp], count_ref[grp]

            def mma(idx, lhs_smem, dout_smem, acc_ref):
                t = idx[0]

                # Rows of the group's first and last tile that belong to other
                # groups are zeroed before use.
                @pl.when((t == 0) | (t == count - 1))
                def _():
                    zero_other_groups(lhs_smem, (first + t) * tr, start, end)

                plgpu.wgmma(acc_ref, lhs_smem.transpose((1, 0)), dout_smem)
                return acc_ref

            def accumulate(acc_ref):
                @pl.when(count > 0)
                def _():
                    plgpu.emit_pipeline(
                        lambda idx, a, b: mma(idx, a, b, acc_ref),
                        grid=(count,),
                        in_specs=[
                            plgpu.BlockSpec((tr, tk), lambda t: (first + t, ki), delay_release=1),
                            plgpu.BlockSpec((tr, tn), lambda t: (first + t, ni), delay_release=1),
                        ],
                        max_concurrent_steps=depth,
                    )(lhs_ref, dout_ref)
                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((tk, tn)))
            # The previous item's store may still be reading out_smem.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[...] = acc.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem,
                                    out_ref.at[grp, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)])

        plgpu.wait_smem_to_gmem(0)

    out = launch(transposed_grouped_matmul,
                 jax.ShapeDtypeStruct((g, k_pad, n_pad), out_dtype),
                 [plgpu.SMEM((tk, tn), out_dtype)], interpret)(
        starts, ends, first_tile, tile_count, lhs, dout)
    return out[:, :k, :n]
