"""Public grouped matmul (dropless mixture-of-experts) with ``implementation=``
dispatch.

gmm(lhs [M,K], rhs [G,K,N], group_sizes [G]) -> [M,N]: rows are grouped
contiguously, rows [start_g, start_g + group_sizes[g]) use rhs[g], rows past
sum(group_sizes) give zeros. transpose_rhs=True takes rhs as [G,N,K].
tgmm(lhs [M,K], dout [M,N], group_sizes) -> [G,K,N]: per group
lhs[rows_g]^T @ dout[rows_g] (zeros for empty groups); this is gmm's d-rhs.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the pure-jnp reference (differentiated by XLA);
  'ragged_dot' jax.lax.ragged_dot / ragged_dot_general;
  'mosaic_gpu' the Hopper kernels of mosaic_gpu.py (bf16/f16, compiled);
  'blockspec'  the portable kernels of blockspec.py, interpreted only (their
               scalar-prefetch grid has no GPU lowering);
  'pallas'     'mosaic_gpu' where it takes the call, else 'blockspec'. gmm's
               gradient is a custom VJP built from the same kernels: d-lhs =
               gmm(dout, rhs, transpose_rhs=not transpose_rhs), d-rhs =
               tgmm(lhs, dout) (or tgmm(dout, lhs) when transpose_rhs). tgmm
               itself has no gradient here.
  'auto'       the first of 'pallas', 'ragged_dot', 'xla' that runs natively:
               the Mosaic kernel on Hopper for bf16/f16, ragged_dot on other
               GPUs and for float32, the reference on CPU.
lhs, rhs, dout and group_sizes are jax or NumPy arrays (Python lists are
refused); group_sizes has an integer dtype. Concrete group_sizes must be
non-negative with sum <= M (a ValueError names them). Traced ones (under jit)
cannot be checked and are defined instead, for every implementation:
negative sizes count as 0 and groups reaching past M are cut at M (``clamp``),
so rows past the clamped sum come out zero in gmm and are ignored by tgmm.
tiling=(tm, tk, tn): positive ints, the row, contraction and column tile of
the Pallas kernels (for tgmm: row tile, K tile, N tile); through gmm's VJP
the same tiling reaches its d-lhs gmm and d-rhs tgmm.
consumers (1 or 2, 'mosaic_gpu' only): 2 runs the Hopper kernels of
two_consumers.py, a producer warpgroup and two consumer warpgroups that
split each output tile (gmm: its rows, tgmm: its K rows, each 128 or 256);
tiling None then means the tuning table's tiling for the device and shape
(tuning.py), else their own defaults; 16-bit outputs only. An opt-in: 1 is
the default.
pingpong (gmm, consumers=2 only): the two consumers take whole gmm items in
turn instead of splitting each one, so one's epilogue overlaps the other's
products; a given tiling is then one consumer's item and applies to the
forward and d-lhs gmm, while the d-rhs tgmm keeps its default.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat, dispatch
from pallas_kernels.grouped_matmul import blockspec, mosaic_gpu, tuning, two_consumers
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
BLOCKSPEC_TILING = (128, 128, 128)


def _consumers(args) -> int:
    """The call's consumers (callers of the table that leave it out mean 1)."""
    return getattr(args, "consumers", 1)


def _one_consumer(args):
    if _consumers(args) != 1:
        return (f"takes no consumers (consumers={args.consumers} splits the Mosaic GPU "
                f"kernels' tiles between warpgroups)")
    return None


def _takes_no_tiling(args):
    if args.tiling is not None:
        return f"takes no tiling (tiling={args.tiling} tiles the Pallas kernels)"
    return _one_consumer(args)


def _interpreted_only(args):
    if not args.interpret:
        return "runs interpreted only (its scalar-prefetch grid has no GPU lowering)"
    return _one_consumer(args)


def _tgmm_tiling(tiling, pingpong: bool):
    """The tgmm's tiling of a call: with pingpong a given tiling is the gmm's,
    and the VJP's tgmm keeps its default."""
    return None if pingpong else tiling


def _mosaic_problem(args):
    problem = mosaic_gpu.unsupported(args.dtype, args.tiling)
    if problem is None and _consumers(args) == 2:
        pingpong = getattr(args, "pingpong", False)
        tiling = _tgmm_tiling(args.tiling, pingpong) if args.op == "tgmm" else args.tiling
        return two_consumers.unsupported(tiling, args.op, getattr(args, "out_dtype", None),
                                         pingpong)
    return problem


TABLE = dispatch.Table("grouped matmul", {
    "xla": _takes_no_tiling,
    "ragged_dot": _takes_no_tiling,
    "mosaic_gpu": _mosaic_problem,
    "blockspec": _interpreted_only,
}, preference=("pallas", "ragged_dot", "xla"))
IMPLEMENTATIONS = TABLE.names


class _Config(NamedTuple):
    """Static settings of one Pallas call (hashable, for custom_vjp)."""
    out_dtype: jnp.dtype
    tiling: tuple | None
    kernel: dispatch.Choice   # 'mosaic_gpu' or 'blockspec'
    consumers: int = 1        # 2: the kernels of two_consumers.py
    transpose_rhs: bool = False
    pingpong: bool = False    # consumers=2: whole gmm items in turn


def check_group_sizes(group_sizes, rows: int):
    """group_sizes as a [G] int32 array (G >= 1): concrete ones must be
    non-negative with sum <= rows, traced ones are clamped (``clamp``)."""
    group_sizes = dispatch.as_array("group_sizes", group_sizes, integer=True)
    if group_sizes.ndim != 1 or group_sizes.shape[0] < 1:
        raise ValueError(f"group_sizes must be [G] with G >= 1; got shape {group_sizes.shape}")
    if isinstance(group_sizes, jax.core.Tracer):
        return clamp(group_sizes, rows)
    sizes = np.asarray(group_sizes)
    if (sizes < 0).any():
        raise ValueError(f"group_sizes must be non-negative; got {sizes.tolist()}")
    if sizes.sum() > rows:
        raise ValueError(f"sum(group_sizes)={int(sizes.sum())} exceeds the {rows} rows of lhs")
    return group_sizes.astype(jnp.int32)


def clamp(group_sizes, rows: int):
    """The sizes traced group_sizes are taken as: negative ones count as 0,
    and the groups are cut where their running sum reaches ``rows``."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), rows)
    return jnp.diff(ends, prepend=0).astype(jnp.int32)


def _check_common(lhs, group_sizes, tiling, preferred_element_type, consumers, pingpong=False):
    """-> (lhs, group_sizes as check_group_sizes gives them, tiling as a tuple)."""
    lhs = dispatch.as_array("lhs", lhs)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K]; got shape {lhs.shape}")
    if lhs.shape[0] < 1:
        raise ValueError(f"lhs needs at least one row; got shape {lhs.shape}")
    if lhs.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {lhs.dtype}; use float32, bfloat16 or float16")
    group_sizes = check_group_sizes(group_sizes, lhs.shape[0])
    if tiling is not None:
        tiling = dispatch.check_sizes("tiling", tiling, 3)
    if preferred_element_type is not None:
        dispatch.check_dtype("preferred_element_type", preferred_element_type)
    if dispatch.check_size("consumers", consumers) > 2:
        raise ValueError(f"consumers must be 1 or 2, got {consumers}")
    if pingpong and consumers != 2:
        raise ValueError(f"pingpong=True alternates items between two consumer warpgroups: it "
                         f"needs consumers=2, got consumers={consumers}")
    return lhs, group_sizes, tiling


def _resolve(implementation, dtype, preferred_element_type, tiling, interpret, consumers, op,
             pingpong=False):
    """-> (the implementation's name, the Pallas call's settings or None)."""
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    choice = TABLE.resolve(implementation, interpret, dtype=dtype, tiling=tiling,
                           consumers=int(consumers), op=op, out_dtype=out_dtype,
                           pingpong=bool(pingpong))
    if choice.name not in dispatch.PALLAS_KERNELS:
        return choice.name, None
    return "pallas", _Config(out_dtype, tiling, choice, int(consumers), pingpong=bool(pingpong))


# The kernel calls are jitted per static configuration: jax lowers a jitted
# callee once per module, so a model's MoE layers share one lowering of each
# Mosaic kernel instead of one per layer.
@functools.partial(jax.jit, static_argnums=3)
def _gmm_kernel(lhs, rhs, group_sizes, cfg: _Config):
    if cfg.kernel.name == "blockspec":
        return blockspec.gmm(lhs, rhs, group_sizes, transpose_rhs=cfg.transpose_rhs,
                             out_dtype=cfg.out_dtype, tiling=cfg.tiling or BLOCKSPEC_TILING,
                             interpret=cfg.kernel.interpret)
    if cfg.consumers == 2:
        n = rhs.shape[1] if cfg.transpose_rhs else rhs.shape[2]
        tiling = cfg.tiling or _tuned("gmm_t" if cfg.transpose_rhs else "gmm",
                                      "pingpong" if cfg.pingpong else "split", lhs.shape[1], n)
        return two_consumers.gmm(lhs, rhs, group_sizes, transpose_rhs=cfg.transpose_rhs,
                                 out_dtype=cfg.out_dtype, tiling=tiling, pingpong=cfg.pingpong)
    return mosaic_gpu.gmm(lhs, rhs, group_sizes, transpose_rhs=cfg.transpose_rhs,
                          out_dtype=cfg.out_dtype, tiling=cfg.tiling or mosaic_gpu.DEFAULT_TILING)


@functools.partial(jax.jit, static_argnums=3)
def _tgmm_kernel(lhs, dout, group_sizes, cfg: _Config):
    if cfg.kernel.name == "blockspec":
        return blockspec.tgmm(lhs, dout, group_sizes, out_dtype=cfg.out_dtype,
                              tiling=cfg.tiling or BLOCKSPEC_TILING,
                              interpret=cfg.kernel.interpret)
    if cfg.consumers == 2:
        tiling = (_tgmm_tiling(cfg.tiling, cfg.pingpong)
                  or _tuned("tgmm", "split", lhs.shape[1], dout.shape[1]))
        return two_consumers.tgmm(lhs, dout, group_sizes, out_dtype=cfg.out_dtype, tiling=tiling)
    return mosaic_gpu.tgmm(lhs, dout, group_sizes, out_dtype=cfg.out_dtype,
                           tiling=cfg.tiling or mosaic_gpu.DEFAULT_TGMM_TILING)


def _tuned(kernel, schedule, k, n):
    """The two-consumer kernels' tiling from the tuning table (tuning.py) for
    this device and shape, or None for their defaults."""
    return tuning.tiling_for(compat.device_kind(), kernel, schedule, k, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas_gmm(lhs, rhs, group_sizes, cfg: _Config):
    return _gmm_kernel(lhs, rhs, group_sizes, cfg)


def _pallas_gmm_fwd(lhs, rhs, group_sizes, cfg):
    return _gmm_kernel(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _pallas_gmm_bwd(cfg, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = _gmm_kernel(dout, rhs, group_sizes,
                       cfg._replace(out_dtype=lhs.dtype, transpose_rhs=not cfg.transpose_rhs))
    grad_cfg = cfg._replace(out_dtype=rhs.dtype)
    if cfg.transpose_rhs:   # rhs[g] is [N, K]: its gradient is dout_g^T @ lhs_g
        drhs = _tgmm_kernel(dout, lhs, group_sizes, grad_cfg)
    else:
        drhs = _tgmm_kernel(lhs, dout, group_sizes, grad_cfg)
    return dlhs, drhs, None


_pallas_gmm.defvjp(_pallas_gmm_fwd, _pallas_gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, implementation: str = "auto", preferred_element_type=None,
        tiling=None, interpret: bool | None = None, transpose_rhs: bool = False,
        consumers: int = 1, pingpong: bool = False):
    """Grouped matmul lhs [M,K] x rhs [G,K,N] -> [M,N] (see module docstring)."""
    lhs, group_sizes, tiling = _check_common(lhs, group_sizes, tiling, preferred_element_type,
                                             consumers, pingpong)
    rhs = dispatch.as_array("rhs", rhs)
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [G, K, N]; got shape {rhs.shape}")
    g, rk = rhs.shape[0], rhs.shape[2 if transpose_rhs else 1]
    if rk != lhs.shape[1]:
        raise ValueError(f"contraction sizes differ: lhs {lhs.shape} vs rhs {rhs.shape}"
                         f"{' (transposed)' if transpose_rhs else ''}")
    if group_sizes.shape[0] != g:
        raise ValueError(f"group_sizes has {group_sizes.shape[0]} groups but rhs has {g}")
    if rhs.dtype != lhs.dtype:
        raise ValueError(f"lhs and rhs dtypes differ: {lhs.dtype} vs {rhs.dtype}")
    impl, cfg = _resolve(implementation, lhs.dtype, preferred_element_type, tiling, interpret,
                         consumers, "gmm", pingpong)
    if impl == "xla":
        return gmm_reference(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                             preferred_element_type=preferred_element_type)
    if impl == "ragged_dot":
        rhs_kn = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        out = jax.lax.ragged_dot(lhs, rhs_kn, group_sizes,
                                 preferred_element_type=preferred_element_type)
        return _zero_tail(out, group_sizes)
    return _pallas_gmm(lhs, rhs, group_sizes, cfg._replace(transpose_rhs=transpose_rhs))


def _zero_tail(out, group_sizes):
    # ragged_dot leaves rows past sum(group_sizes) unspecified; the spec says zero.
    rows = jnp.arange(out.shape[0])[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), out, 0).astype(out.dtype)


def tgmm(lhs, dout, group_sizes, *, implementation: str = "auto", preferred_element_type=None,
         tiling=None, interpret: bool | None = None, consumers: int = 1):
    """Per-group lhs[rows_g]^T @ dout[rows_g]: [M,K] x [M,N] -> [G,K,N]."""
    lhs, group_sizes, tiling = _check_common(lhs, group_sizes, tiling, preferred_element_type,
                                             consumers)
    dout = dispatch.as_array("dout", dout)
    if dout.ndim != 2 or dout.shape[0] != lhs.shape[0]:
        raise ValueError(f"dout must be [M, N] with the M={lhs.shape[0]} rows of lhs; "
                         f"got shape {dout.shape}")
    if dout.dtype != lhs.dtype:
        raise ValueError(f"lhs and dout dtypes differ: {lhs.dtype} vs {dout.dtype}")
    impl, cfg = _resolve(implementation, lhs.dtype, preferred_element_type, tiling, interpret,
                         consumers, "tgmm")
    if impl == "xla":
        return tgmm_reference(lhs, dout, group_sizes,
                              preferred_element_type=preferred_element_type)
    if impl == "ragged_dot":
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims,
                                          preferred_element_type=preferred_element_type)
    return _tgmm_kernel(lhs, dout, group_sizes, cfg)
