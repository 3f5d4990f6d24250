"""RMSNorm and the residual add fused with it in BlockSpec-style Pallas,
forward and backward (docs/design/rms-norm.md).

Runs interpreted on CPU and compiles through Pallas's Triton lowering on an
NVIDIA GPU. The input's leading dimensions are flattened into rows, [N, D].
Every program holds whole rows: D is widened to a power of two (a Triton
tensor side) by masked loads and stores, and a last row block that runs
past N is masked the same way, so no padded copy of any array is made.

  forward   grid (N / tile,): one tile of rows -> y (and the sum x + delta)
            and, when differentiating, each row's float32 rstd;
  backward  grid (programs,): a program walks `steps` tiles of rows and in
            that one pass writes dx (the sum's own cotangent added, for
            add_rms_norm) and its rows' float32 d-scale sum: [programs, D]
            partial sums that XLA adds up.

With x_hat = x * rstd and g = dy * scale, the input gradient is
dx = rstd * (g - x_hat * mean(g * x_hat)) and d-scale = sum over rows of
dy * x_hat.
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

MAX_DIM = 8192          # widest row a program holds: D float32 values live in registers
_TILE_ELEMENTS = 4096   # values a tile holds: tile rows = this / padded width (at least one)
_PROGRAMS_PER_SM = 2    # backward programs per streaming multiprocessor
_WARPS = 8              # a tile holds at least 4096 values: 16 or more a thread


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a call's rows are cut into programs (static: part of the kernels' jit key)."""
    rows: int       # N
    dim: int        # D
    width: int      # D rounded up to a power of two
    tile: int       # rows a tile holds (a power of two)
    steps: int      # tiles a backward program walks
    eps: float
    interpret: bool


def layout(rows: int, dim: int, eps: float, interpret: bool) -> Layout:
    """The tiling of an [rows, dim] input (dim <= MAX_DIM)."""
    width = pl.next_power_of_2(dim)
    tile = max(1, _TILE_ELEMENTS // width)
    steps = max(1, cdiv(cdiv(rows, tile), _PROGRAMS_PER_SM * compat.sm_count()))
    return Layout(rows, dim, width, tile, steps, float(eps), interpret)


def _row_mask(cfg: Layout, first_row, block_rows: int):
    """[tile] rows of the tile starting at ``first_row`` that lie in the
    array; None when no row block of ``block_rows`` rows runs past it."""
    if cfg.rows % block_rows == 0:
        return None
    return first_row + lax.iota(jnp.int32, cfg.tile) < cfg.rows


def _column_mask(cfg: Layout):
    """[width] columns that lie in the array; None when D is a power of two."""
    return None if cfg.dim == cfg.width else lax.iota(jnp.int32, cfg.width) < cfg.dim


def _tile_mask(cfg: Layout, rows_ok, cols_ok):
    """[tile, width] mask from a tile's row and column masks (None: all in)."""
    shape = (cfg.tile, cfg.width)
    if rows_ok is None:
        return None if cols_ok is None else jnp.broadcast_to(cols_ok[None, :], shape)
    if cols_ok is None:
        return jnp.broadcast_to(rows_ok[:, None], shape)
    return rows_ok[:, None] & cols_ok[None, :]


def _load(ref, mask):
    """ref's block, zero where mask is False (None: all of it lies in the array)."""
    if mask is None:
        return ref[...]
    return pltriton.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))


def _store(ref, value, mask):
    if mask is None:
        ref[...] = value
    else:
        pltriton.store(ref, value, mask=mask)


def _forward_kernel(*refs, cfg: Layout, add: bool, save_rstd: bool):
    """refs: x, [delta], scale -> [sum], y, [rstd]."""
    refs = list(refs)
    x_ref = refs.pop(0)
    delta_ref = refs.pop(0) if add else None
    scale_ref = refs.pop(0)
    sum_ref = refs.pop(0) if add else None
    y_ref = refs.pop(0)
    rows_ok = _row_mask(cfg, pl.program_id(0) * cfg.tile, cfg.tile)
    cols_ok = _column_mask(cfg)
    mask = _tile_mask(cfg, rows_ok, cols_ok)
    x = _load(x_ref, mask)
    if add:
        x = (x + _load(delta_ref, mask)).astype(x_ref.dtype)
        _store(sum_ref, x, mask)
    xf = x.astype(jnp.float32)
    # Padded columns hold zeros: the sum of squares over the width is the row's.
    rstd = 1.0 / jnp.sqrt(jnp.sum(xf * xf, axis=1) / cfg.dim + cfg.eps)
    scale = _load(scale_ref, cols_ok).astype(jnp.float32)
    _store(y_ref, (xf * rstd[:, None] * scale[None, :]).astype(y_ref.dtype), mask)
    if save_rstd:
        _store(refs.pop(0), rstd, rows_ok)


def _backward_kernel(*refs, cfg: Layout, add: bool):
    """refs: x (or the sum), dy, [d_sum], rstd, scale -> dx, partial d-scale."""
    refs = list(refs)
    x_ref, dy_ref = refs.pop(0), refs.pop(0)
    dsum_ref = refs.pop(0) if add else None
    rstd_ref, scale_ref, dx_ref, dscale_ref = refs
    block_rows = cfg.tile * cfg.steps
    first_row = pl.program_id(0) * block_rows
    cols_ok = _column_mask(cfg)
    scale = _load(scale_ref, cols_ok).astype(jnp.float32)

    def step(j, dscale):
        start = pl.multiple_of(j * cfg.tile, cfg.tile)
        rows_ok = _row_mask(cfg, first_row + start, block_rows)
        mask = _tile_mask(cfg, rows_ok, cols_ok)
        rows = pl.ds(start, cfg.tile)
        # Rows and columns outside the array load as zeros and add nothing.
        x = _load(x_ref.at[rows, :], mask).astype(jnp.float32)
        dy = _load(dy_ref.at[rows, :], mask).astype(jnp.float32)
        rstd = _load(rstd_ref.at[rows], rows_ok)
        x_hat = x * rstd[:, None]
        g = dy * scale[None, :]
        mean_gx = jnp.sum(g * x_hat, axis=1) / cfg.dim
        dx = rstd[:, None] * (g - x_hat * mean_gx[:, None])
        if add:
            dx = dx + _load(dsum_ref.at[rows, :], mask).astype(jnp.float32)
        _store(dx_ref.at[rows, :], dx.astype(dx_ref.dtype), mask)
        return dscale + jnp.sum(dy * x_hat, axis=0)

    dscale_ref[...] = lax.fori_loop(0, cfg.steps, step, jnp.zeros((cfg.width,), jnp.float32))


def _params(cfg: Layout, stages: int):
    if cfg.interpret:
        return None
    return compat.triton_compiler_params(num_warps=_WARPS, num_stages=stages)


def _forward(x, delta, scale, cfg: Layout, *, save_rstd: bool):
    """x, delta (or None) [N, D], scale [D] -> [sum], y, [rstd float32 [N]]."""
    add = delta is not None
    rows = pl.BlockSpec((cfg.tile, cfg.width), lambda i: (i, 0))
    vector = pl.BlockSpec((cfg.width,), lambda i: (0,))
    arrays = [jax.ShapeDtypeStruct(x.shape, x.dtype)] * (2 if add else 1)
    out_specs = [rows] * len(arrays)
    if save_rstd:
        arrays.append(jax.ShapeDtypeStruct((cfg.rows,), jnp.float32))
        out_specs.append(pl.BlockSpec((cfg.tile,), lambda i: (i,)))
    inputs = (x, delta, scale) if add else (x, scale)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, add=add, save_rstd=save_rstd),
        grid=(cdiv(cfg.rows, cfg.tile),),
        in_specs=[rows] * (len(inputs) - 1) + [vector], out_specs=out_specs, out_shape=arrays,
        interpret=cfg.interpret, compiler_params=_params(cfg, stages=1),
        name="add_rms_norm_forward" if add else "rms_norm_forward",
    )(*inputs)


def _backward(x, dy, dsum, rstd, scale, cfg: Layout):
    """x (or the sum), dy, d_sum (or None) [N, D], rstd [N], scale [D] ->
    (dx [N, D] in x.dtype, d-scale float32 [D])."""
    add = dsum is not None
    block_rows = cfg.tile * cfg.steps
    programs = cdiv(cfg.rows, block_rows)
    rows = pl.BlockSpec((block_rows, cfg.width), lambda i: (i, 0))
    inputs = (x, dy, dsum) if add else (x, dy)
    dx, partial = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, add=add), grid=(programs,),
        in_specs=[rows] * len(inputs) + [pl.BlockSpec((block_rows,), lambda i: (i,)),
                                         pl.BlockSpec((cfg.width,), lambda i: (0,))],
        out_specs=[rows, pl.BlockSpec((None, cfg.width), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((programs, cfg.width), jnp.float32)],
        interpret=cfg.interpret, compiler_params=_params(cfg, stages=2),
        name="add_rms_norm_backward" if add else "rms_norm_backward",
    )(*inputs, rstd, scale)
    return dx, jnp.sum(partial[:, :cfg.dim], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, scale, cfg):
    (y,) = _forward(x, None, scale, cfg, save_rstd=False)
    return y


def _rms_norm_fwd(x, scale, cfg):
    y, rstd = _forward(x, None, scale, cfg, save_rstd=True)
    return y, (x, rstd, scale)


def _rms_norm_bwd(cfg, residuals, dy):
    x, rstd, scale = residuals
    dx, dscale = _backward(x, dy, None, rstd, scale, cfg)
    return dx, dscale.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _add_rms_norm(x, delta, scale, cfg):
    total, y = _forward(x, delta, scale, cfg, save_rstd=False)
    return total, y


def _add_rms_norm_fwd(x, delta, scale, cfg):
    total, y, rstd = _forward(x, delta, scale, cfg, save_rstd=True)
    return (total, y), (total, rstd, scale)


def _add_rms_norm_bwd(cfg, residuals, cotangents):
    total, rstd, scale = residuals
    dtotal, dy = cotangents
    # x and delta reach the outputs only through their sum: both get its gradient.
    d, dscale = _backward(total, dy, dtotal, rstd, scale, cfg)
    return d, d, dscale.astype(scale.dtype)


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def blockspec_rms_norm(x, scale, *, eps, interpret=False):
    """Differentiable RMSNorm of x [..., D] (D <= MAX_DIM) with scale [D],
    checked as api.rms_norm does -> [..., D] in x.dtype. interpret=True
    runs on CPU; False compiles for a GPU through Triton."""
    D = x.shape[-1]
    cfg = layout(x.size // D, D, eps, interpret)
    return _rms_norm(x.reshape(cfg.rows, D), scale, cfg).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def blockspec_add_rms_norm(x, delta, scale, *, eps, interpret=False):
    """Differentiable (x + delta, RMSNorm of it) for x, delta [..., D] of
    one dtype, as blockspec_rms_norm."""
    D = x.shape[-1]
    cfg = layout(x.size // D, D, eps, interpret)
    total, y = _add_rms_norm(x.reshape(cfg.rows, D), delta.reshape(cfg.rows, D), scale, cfg)
    return total.reshape(x.shape), y.reshape(x.shape)
