"""Quantised-weight grouped matmul as a portable Pallas kernel: interpreted
anywhere (``interpret=True``, e.g. on CPU) and compiled by Pallas's Triton
lowering on GPU.

The row schedule is grouped_matmul.schedule's: one *step* per (group, row
tile) pair, ordered by group. The Triton lowering has neither scalar
prefetch nor scratch memory, so the schedule arrays are ordinary inputs read
as scalars, the operands stay whole in memory and each program loads its
tiles at offsets taken from the schedule, and the float32 accumulator is a
loop carry. One program owns one step and one column tile and sums all of
K: it stores only its step's rows (a masked store), so the programs that
share a row tile (a group boundary inside it) write disjoint rows.

Dequantisation happens on the tile in registers: per K step the codes tile
is converted to the lhs dtype (int8 and e4m3 exactly; int4 by the
magic-number unpacking of quant_matmul.packing, even and odd k against the
even and odd columns of lhs, split by the wrapper) and multiplied on the
tensor cores with a float32 result; the group's scales [1, tn] multiply the
partial sum of its K steps, never the [tk, tn] weights. K steps therefore
divide the scale group: ``tk`` is the largest power of two dividing
group_size, at most tiling's tk, and at least 16 (32 for int4, whose dots
contract tk/2). Zero points (int4) subtract zero * (row sum of lhs over the
group) from the group's partial sum.

Programs run in bands of SWIZZLE steps: a band's programs sweep the column
tiles with the band's row tiles (and usually one group's weights) resident
in L2, instead of every program of a step streaming a whole expert's
weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import compat
from pallas_kernels.grouped_matmul.schedule import make_schedule, num_steps
from pallas_kernels.quant_matmul.packing import unpack_nibbles_float
from pallas_kernels.quant_matmul.tiling import MIN_DOT, pow2_block
from pallas_kernels.shapes import pad_to, round_up

SWIZZLE = 8
NT = (((1,), (1,)), ((), ()))  # x [m, c] . w [n, c]^T
NN = (((1,), (0,)), ((), ()))


def k_step(kind: str, group_size: int, preferred: int) -> int:
    """The K step: the largest power of two dividing group_size, capped at
    preferred (0 if it is below the kernel's minimum for kind)."""
    tk = 1
    while group_size % (2 * tk) == 0 and 2 * tk <= preferred:
        tk *= 2
    return tk if tk >= min_k_step(kind) else 0


def min_k_step(kind: str) -> int:
    return 2 * MIN_DOT if kind == "int4" else MIN_DOT


def _band(pid, steps: int, n_tiles: int):
    """(step, column tile) of program pid: bands of SWIZZLE steps, column
    tiles outer within a band, steps inner."""
    per_band = SWIZZLE * n_tiles
    first = (pid // per_band) * SWIZZLE
    size = jnp.minimum(steps - first, SWIZZLE)
    within = pid % per_band
    return first + within % size, within // size


def _kernel(group_ref, tile_ref, lo_ref, hi_ref, *refs, kind: str, groups: int, tm: int,
            tn: int, tk: int, gs: int, k: int, steps: int, n_tiles: int, asymmetric: bool):
    if kind == "int4":
        xe_ref, xo_ref, c_ref, s_ref, *rest = refs
    else:
        x_ref, c_ref, s_ref, *rest = refs
    z_ref = rest[0] if asymmetric else None
    o_ref = rest[-1]
    s, j = _band(pl.program_id(0), steps, n_tiles)
    g, lo, hi = group_ref[s], lo_ref[s], hi_ref[s]
    row0, col0 = tile_ref[s] * tm, j * tn
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    mine = (rows >= lo) & (rows < hi)
    out = o_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)]
    cd = (xe_ref if kind == "int4" else x_ref).dtype
    # float32 operands: full-precision dots (Triton would use TF32 by default)
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                            precision=lax.Precision.HIGHEST if cd == jnp.float32 else None)

    def k_tile(b, i, carry):
        part, xsum = carry
        kk = b * (gs // tk) + i
        if kind == "int4":
            cols = pl.ds(kk * (tk // 2), tk // 2)
            xe, xo = xe_ref[pl.ds(row0, tm), cols], xo_ref[pl.ds(row0, tm), cols]
            even, odd = unpack_nibbles_float(c_ref[g, pl.ds(col0, tn), cols], cd,
                                             signed=not asymmetric)
            part = part + dot(xe, even, NT) + dot(xo, odd, NT)
            if asymmetric:
                xsum = xsum + jnp.sum(xe.astype(jnp.float32) + xo.astype(jnp.float32), axis=1,
                                      keepdims=True)
        else:
            ks = pl.ds(kk * tk, tk)
            part = part + dot(x_ref[pl.ds(row0, tm), ks],
                              c_ref[g, ks, pl.ds(col0, tn)].astype(cd), NN)
        return part, xsum

    def scale_group(b, acc):
        part, xsum = lax.fori_loop(0, gs // tk, functools.partial(k_tile, b),
                                   (jnp.zeros((tm, tn), jnp.float32),
                                    jnp.zeros((tm, 1), jnp.float32)))
        if asymmetric:
            part = part - xsum * z_ref[g, pl.ds(b, 1), pl.ds(col0, tn)]
        return acc + part * s_ref[g, pl.ds(b, 1), pl.ds(col0, tn)]

    @pl.when((hi > lo) & (g < groups))
    def _():
        acc = lax.fori_loop(0, k // gs, scale_group, jnp.zeros((tm, tn), jnp.float32))
        pltriton.store(out, acc.astype(o_ref.dtype), mask=mine)

    @pl.when((hi > lo) & (g >= groups))  # rows past sum(group_sizes)
    def _():
        pltriton.store(out, jnp.zeros((tm, tn), o_ref.dtype), mask=mine)


@functools.partial(jax.jit, static_argnames=("kind", "group_size", "out_dtype", "tiling",
                                             "interpret", "num_warps", "num_stages"))
def qgmm(lhs, codes, scales, group_sizes, zeros=None, *, kind: str, group_size: int, out_dtype,
         tiling=(128, 64, 128), interpret: bool = True, num_warps: int = 4,
         num_stages: int = 3):
    """See the module docstring; arguments as api.qgmm (already checked)."""
    m, k = lhs.shape
    g = codes.shape[0]
    n = codes.shape[1] if kind == "int4" else codes.shape[2]
    tm, tn = pow2_block(m, tiling[0]), pow2_block(n, tiling[2])
    tk = k_step(kind, group_size, tiling[1])
    mp, np_ = round_up(m, tm), round_up(n, tn)
    # Zero padding (a copy, only when a size is not a tile multiple) keeps
    # every tile load in bounds; padded rows and columns are never stored.
    lhs = pad_to(lhs, (mp, k))
    if kind == "int4":
        operands = [lhs[:, 0::2], lhs[:, 1::2], pad_to(codes, (g, np_, k // 2))]
    else:
        operands = [lhs, pad_to(codes, (g, k, np_))]
    operands.append(pad_to(scales.astype(jnp.float32), (g, k // group_size, np_)))
    if zeros is not None:
        operands.append(pad_to(zeros.astype(jnp.float32), (g, k // group_size, np_)))
    sched = make_schedule(group_sizes, m, tm, zero_tail=True)
    steps, n_tiles = num_steps(m, tm, g + 1), np_ // tn
    kernel = functools.partial(_kernel, kind=kind, groups=g, tm=tm, tn=tn, tk=tk, gs=group_size,
                               k=k, steps=steps, n_tiles=n_tiles, asymmetric=zeros is not None)
    params = {} if interpret else dict(
        compiler_params=compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages))
    out = pl.pallas_call(
        kernel, grid=(steps * n_tiles,),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=interpret, **params,
    )(*sched[:4], *operands)
    return out[:m, :n]
