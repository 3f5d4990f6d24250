"""The row gather in BlockSpec-style Pallas (reference.py is the spec).

Runs interpreted on CPU and compiles through Pallas's Triton lowering on an
NVIDIA GPU. A program owns a tile of output rows, whole (D is a power of
two: a Triton tensor side); a last tile that runs past M is masked, so no
padded copy of any array is made. For each of the r sources it loads the
tile's indices (and weights), then the source rows by a gather load (an
index out of range reads row 0 and is zeroed), and accumulates them in
float32.

The index and weights come transposed, [r, M], so that a source's column
of them is one contiguous load of the tile's rows.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import compat
from pallas_kernels.shapes import cdiv

MAX_DIM = 8192          # widest row: a tile's float32 sums live in registers
MIN_DIM = 16            # narrowest Triton tensor side
_TILE_ELEMENTS = 8192   # values a tile holds: tile rows = this / padded width (at least one)
_WARPS = 8


@dataclasses.dataclass(frozen=True)
class Layout:
    """A call's tiling (static: part of the kernel's jit key)."""
    rows: int       # M
    sources: int    # r
    src_rows: int   # N
    dim: int        # D, a power of two
    tile: int       # output rows a program owns (a power of two)
    weighted: bool


def unsupported(dim: int) -> str | None:
    """Why the kernel cannot take rows of ``dim`` values (None if it can)."""
    if dim > MAX_DIM or dim < MIN_DIM or dim & (dim - 1):
        return f"takes rows of a power of two from {MIN_DIM} to {MAX_DIM} values, got {dim}"
    return None


def layout(rows: int, sources: int, src_rows: int, dim: int, weighted: bool) -> Layout:
    tile = min(max(1, _TILE_ELEMENTS // dim), pl.next_power_of_2(rows))
    return Layout(rows, sources, src_rows, dim, tile, weighted)


def _kernel(*refs, cfg: Layout):
    """refs: index [r, M], [weight [r, M]], src [N, D] -> out [M, D] (tile blocks)."""
    if cfg.weighted:
        index_ref, weight_ref, src_ref, out_ref = refs
    else:
        (index_ref, src_ref, out_ref), weight_ref = refs, None
    first = pl.program_id(0) * cfg.tile
    rows_ok = first + lax.iota(jnp.int32, cfg.tile) < cfg.rows
    acc = jnp.zeros((cfg.tile, cfg.dim), jnp.float32)
    n = cfg.src_rows
    for j in range(cfg.sources):
        index = pltriton.load(index_ref.at[jnp.int32(j)], mask=rows_ok, other=n)
        index = jnp.where(index < 0, index + n, index)  # counted from the end, as jnp.take
        ok = (index >= 0) & (index < n)
        rows = jnp.where(ok[:, None], src_ref[jnp.where(ok, index, 0), :].astype(jnp.float32), 0.0)
        if cfg.weighted:
            weight = pltriton.load(weight_ref.at[jnp.int32(j)], mask=rows_ok, other=0)
            rows = weight.astype(jnp.float32)[:, None] * rows
        acc = acc + rows
    pltriton.store(out_ref, acc.astype(out_ref.dtype), mask=rows_ok[:, None])


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def blockspec_row_gather(src, index, weight=None, *, out_dtype, interpret=False):
    """reference.row_gather by the kernel; index [M, r] int32, weight [M, r] or None."""
    (n, d), (m, r) = src.shape, index.shape
    cfg = layout(m, r, n, d, weight is not None)
    tiles = pl.BlockSpec((r, cfg.tile), lambda i: (0, i))
    operands = [index.astype(jnp.int32).T]
    specs = [tiles]
    if weight is not None:
        operands.append(weight.T)
        specs.append(tiles)
    operands.append(src)
    specs.append(pl.BlockSpec((n, d), lambda i: (0, 0)))
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(cdiv(m, cfg.tile),),
        in_specs=specs,
        out_specs=pl.BlockSpec((cfg.tile, d), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((m, d), out_dtype),
        interpret=interpret,
        compiler_params=None if interpret else compat.triton_compiler_params(
            num_warps=_WARPS, num_stages=1),
        name="row_gather",
    )(*operands)
