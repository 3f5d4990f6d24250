"""Portable BlockSpec Pallas kernels for gmm and tgmm.

The tile schedule (schedule.py) is passed as scalar prefetch, so index maps
pick each step's row tile and group. Runs anywhere Pallas interprets
(``interpret=True``, e.g. on CPU) and follows TPU block rules.

gmm grid (n tiles, steps, k tiles): a float32 scratch accumulates over k; on
the last k tile the step's rows are merged into the output block, which stays
resident while consecutive steps share a row tile.
tgmm grid (k tiles, n tiles, steps): steps of one group are consecutive and
map to the same [K-tile, N-tile] output block; rows outside the step's range
are masked out of the contraction.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul.schedule import make_schedule, num_steps
from pallas_kernels.shapes import pad_axis_to_multiple


def _rows_in(lo, hi, tile, tm, shape):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= lo) & (rows < hi)


def _fit(size, block):
    """Block size for a dimension: the whole dimension when it is smaller."""
    return size if size <= block else block


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype, tiling=(128, 128, 128),
        interpret=True):
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _fit(m, tiling[0]), _fit(k, tiling[1]), _fit(n, tiling[2])
    # Padded k columns are zero in both operands, so they add nothing; partial
    # m and n blocks only produce rows/columns that are never written back.
    lhs = pad_axis_to_multiple(lhs, 1, tk)
    rhs = pad_axis_to_multiple(rhs, 2 if transpose_rhs else 1, tk)
    k_tiles = lhs.shape[1] // tk
    sched = make_schedule(group_sizes, m, tm, zero_tail=True)

    def rhs_map(j, s, kk, group, tile, lo, hi, first):
        gg = jnp.minimum(group[s], g - 1)
        return (gg, j, kk) if transpose_rhs else (gg, kk, j)

    def kernel(group, tile, lo, hi, first, lhs_ref, rhs_ref, out_ref, acc_ref):
        s, kk = pl.program_id(1), pl.program_id(2)

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when((hi[s] > lo[s]) & (group[s] < g))
        def _():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...], rhs_ref[0], dims, preferred_element_type=jnp.float32)

        @pl.when(kk == k_tiles - 1)
        def _():
            mine = _rows_in(lo[s], hi[s], tile[s], tm, acc_ref.shape)
            prev = jnp.where(first[s] == 1, 0.0, out_ref[...].astype(jnp.float32))
            out_ref[...] = jnp.where(mine, acc_ref[...], prev).astype(out_ref.dtype)

    rhs_block = (1, tn, tk) if transpose_rhs else (1, tk, tn)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(sched),
        grid=(pl.cdiv(n, tn), num_steps(m, tm, g + 1), k_tiles),
        in_specs=[pl.BlockSpec((tm, tk), lambda j, s, kk, group, tile, *_: (tile[s], kk)),
                  pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((tm, tn), lambda j, s, kk, group, tile, *_: (tile[s], j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, interpret=interpret,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    )(*sched, lhs, rhs)


def tgmm(lhs, dout, group_sizes, *, out_dtype, tiling=(128, 128, 128), interpret=True):
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = _fit(m, tiling[0]), _fit(k, tiling[1]), _fit(n, tiling[2])
    sched = make_schedule(group_sizes, m, tm, zero_tail=False)

    def kernel(group, tile, lo, hi, first, lhs_ref, dout_ref, out_ref, acc_ref):
        s = pl.program_id(2)

        @pl.when(first[s] == 1)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(hi[s] > lo[s])
        def _():
            # Select (not multiply) so rows of other groups or past M, which
            # may hold anything, cannot leak in.
            x = jnp.where(_rows_in(lo[s], hi[s], tile[s], tm, lhs_ref.shape), lhs_ref[...], 0)
            y = jnp.where(_rows_in(lo[s], hi[s], tile[s], tm, dout_ref.shape), dout_ref[...], 0)
            acc_ref[...] += jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)

        out_ref[0] = acc_ref[...].astype(out_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(sched),
        grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), num_steps(m, tm, g)),
        in_specs=[pl.BlockSpec((tm, tk), lambda i, j, s, group, tile, *_: (tile[s], i)),
                  pl.BlockSpec((tm, tn), lambda i, j, s, group, tile, *_: (tile[s], j))],
        out_specs=pl.BlockSpec((1, tk, tn), lambda i, j, s, group, *_: (group[s], i, j)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, interpret=interpret,
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
    )(*sched, lhs, dout)
