"""Public quantised-weight grouped matmul with ``implementation=`` dispatch.

qgmm(lhs [M,K], codes, scales [G,K/gs,N], group_sizes [G], *, kind,
group_size) -> [M,N]: the grouped matmul of pallas_kernels.grouped_matmul
with weights stored as low-bit codes plus per-(K group, column) scales;
layouts in reference.py (int8 / e4m3 [G,K,N], int4 packed [G,N,K/2] with
optional zero points).

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'       the jnp reference (dequantise, then a masked einsum),
              differentiated by XLA;
  'blockspec' the portable kernel of blockspec.py, dequantising tile by tile:
              compiled by Pallas's Triton lowering on GPU, interpreted
              elsewhere (interpret=None picks);
  'pallas'    'blockspec' (there is no Mosaic GPU kernel).
              The kernel's gradient is a custom VJP: d-lhs = dout @ W^T by
              grouped_matmul.gmm (transpose_rhs) on the weights dequantised
              into lhs's dtype, d-scales = per scale group sums of codes (less
              zero points) * (lhs^T dout per group), the latter by
              grouped_matmul.tgmm in float32 ([G,K,N], the size of a float
              weight gradient). Both run the grouped-matmul kernels (the
              portable ones interpreted, 'auto' compiled). Codes and zero
              points are integer storage: no gradient.
  'auto'      'pallas' on GPU, 'xla' elsewhere.
The kernel needs K steps that divide the scale group (see blockspec.py):
``unsupported`` says why a (kind, group_size, tiling) cannot run it, and
'pallas' and 'blockspec' raise for those. Arrays are jax or NumPy arrays
(Python lists are refused); group_size is a positive int dividing K.
group_sizes (integers) follow grouped_matmul: concrete ones must be
non-negative with sum <= M; traced ones are clamped (negative sizes count as
0, groups are cut at M; rows past the clamped sum come out zero).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.grouped_matmul.api import check_group_sizes, gmm, tgmm
from pallas_kernels.quant_grouped_matmul import blockspec
from pallas_kernels.quant_grouped_matmul.reference import (CODE_DTYPES, KINDS, dequantize_groups,
                                                           qgmm_reference)

LHS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The fastest (tm, tk, tn) per weight kind on an H100 at Mixtral-sized experts
# (docs/design/grouped-matmul.md): one for few rows per expert
# (decode: small row tiles, the weights stream once) and one for many (prefill).
TUNED_TILINGS = {
    "decode": {"int8": (16, 64, 128), "int4": (16, 128, 128), "fp8": (16, 128, 128)},
    "prefill": {"int8": (128, 64, 128), "int4": (128, 128, 64), "fp8": (64, 128, 128)},
}
DECODE_ROWS_PER_GROUP = 32  # up to this many rows per expert on average: decode tilings


def default_tiling(kind: str, rows: int, groups: int) -> tuple:
    """The tuned tiling for ``rows`` lhs rows over ``groups`` experts."""
    regime = "decode" if rows <= DECODE_ROWS_PER_GROUP * groups else "prefill"
    return TUNED_TILINGS[regime][kind]


class _Config(NamedTuple):
    """Static settings of one kernel call (hashable, for custom_vjp)."""
    kind: str
    group_size: int
    out_dtype: jnp.dtype
    tiling: tuple
    interpret: bool


def unsupported(kind: str, group_size: int, tiling=None) -> str | None:
    """Why the kernel cannot take this weight layout, or None when it can."""
    tk = tiling[1] if tiling else blockspec.min_k_step(kind)  # no tuned K tile is smaller
    if blockspec.k_step(kind, group_size, tk):
        return None
    return (f"group_size={group_size} with K tile {tk}: the kernel's K step must be a power of "
            f"two >= {blockspec.min_k_step(kind)} dividing group_size (kind {kind!r})")


def _takes_no_tiling(args):
    if args.tiling is not None:
        return f"takes no tiling (tiling={args.tiling} tiles the Pallas kernel)"
    return None


TABLE = dispatch.Table("quantised grouped matmul", {
    "xla": _takes_no_tiling,
    "blockspec": lambda args: unsupported(args.kind, args.group_size, args.tiling),
}, preference=("pallas", "xla"))
IMPLEMENTATIONS = TABLE.names


def _check(lhs, codes, scales, group_sizes, zeros, kind, group_size, tiling):
    """-> the arrays as jax arrays (group_sizes as check_group_sizes gives
    them), group_size as an int and tiling as a tuple."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    lhs, codes, scales = (dispatch.as_array(name, a) for name, a in
                          (("lhs", lhs), ("codes", codes), ("scales", scales)))
    if zeros is not None:
        zeros = dispatch.as_array("zeros", zeros)
    group_size = dispatch.check_size("group_size", group_size)
    if lhs.ndim != 2 or lhs.shape[0] < 1:
        raise ValueError(f"lhs must be [M, K] with M >= 1; got shape {lhs.shape}")
    if lhs.dtype not in LHS_DTYPES:
        raise ValueError(f"lhs has dtype {lhs.dtype}; use float32, bfloat16 or float16")
    m, k = lhs.shape
    if codes.dtype != CODE_DTYPES[kind]:
        raise ValueError(f"kind {kind!r} takes {CODE_DTYPES[kind].name} codes; got {codes.dtype}")
    if codes.ndim != 3:
        raise ValueError(f"codes must be 3-D; got shape {codes.shape}")
    g = codes.shape[0]
    if kind == "int4":
        n = codes.shape[1]
        if codes.shape[2] * 2 != k:
            raise ValueError(f"int4 codes must be [G, N, K/2] = [{g}, N, {k / 2}] for the K={k} "
                             f"of lhs; got shape {codes.shape}")
    else:
        n = codes.shape[2]
        if codes.shape[1] != k:
            raise ValueError(f"{kind} codes must be [G, K, N] with the K={k} of lhs; got shape "
                             f"{codes.shape}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} must be a positive divisor of K={k}")
    want = (g, k // group_size, n)
    if scales.shape != want or not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales must be float [G, K/group_size, N] = {want}; got "
                         f"{scales.dtype} {scales.shape}")
    if zeros is not None:
        if kind != "int4":
            raise ValueError(f"zero points are only for kind 'int4' (unsigned codes); got kind "
                             f"{kind!r}")
        if zeros.shape != want:
            raise ValueError(f"zeros must be [G, K/group_size, N] = {want}; got {zeros.shape}")
    group_sizes = check_group_sizes(group_sizes, m)
    if group_sizes.shape[0] != g:
        raise ValueError(f"group_sizes must be [G] = [{g}] (the groups of codes); got shape "
                         f"{group_sizes.shape}")
    if tiling is not None:
        tiling = dispatch.check_sizes("tiling", tiling, 3)
        if any(t & (t - 1) for t in tiling):
            raise ValueError(f"tiling must be three powers of two (tm, tk, tn); got {tiling}")
    return lhs, codes, scales, group_sizes, zeros, group_size, tiling


def _kernel(lhs, codes, scales, group_sizes, zeros, cfg: _Config):
    return blockspec.qgmm(lhs, codes, scales, group_sizes, zeros, kind=cfg.kind,
                          group_size=cfg.group_size, out_dtype=cfg.out_dtype, tiling=cfg.tiling,
                          interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas_qgmm(lhs, codes, scales, group_sizes, zeros, cfg: _Config):
    return _kernel(lhs, codes, scales, group_sizes, zeros, cfg)


def _fwd(lhs, codes, scales, group_sizes, zeros, cfg):
    out = _kernel(lhs, codes, scales, group_sizes, zeros, cfg)
    return out, (lhs, codes, scales, group_sizes, zeros)


def _bwd(cfg, residuals, dout):
    lhs, codes, scales, group_sizes, zeros = residuals
    dout = dout.astype(lhs.dtype)
    grouped = dict(implementation="pallas", interpret=True) if cfg.interpret \
        else dict(implementation="auto")
    # q: the codes less zero points (unit scales); W = q * scale
    q = dequantize_groups(codes, jnp.ones_like(scales), zeros, kind=cfg.kind,
                          group_size=cfg.group_size)
    w = q * jnp.repeat(scales.astype(jnp.float32), cfg.group_size, axis=1)
    dlhs = gmm(dout, w.astype(lhs.dtype), group_sizes, transpose_rhs=True,
               preferred_element_type=lhs.dtype, **grouped)
    # d scale[g, b, n] = sum over k of group b of q[g, k, n] * (lhs_g^T dout_g)[k, n]
    xtd = tgmm(lhs, dout, group_sizes, preferred_element_type=jnp.float32, **grouped)
    g, k, n = q.shape
    dscales = jnp.sum((q * xtd).reshape(g, k // cfg.group_size, cfg.group_size, n), axis=2)
    return dlhs, None, dscales.astype(scales.dtype), None, None


_pallas_qgmm.defvjp(_fwd, _bwd)


def qgmm(lhs, codes, scales, group_sizes, *, kind: str, group_size: int, zeros=None,
         implementation: str = "auto", preferred_element_type=jnp.float32, tiling=None,
         interpret: bool | None = None):
    """lhs [M,K] x the dequantised weights of each group -> [M,N] in
    preferred_element_type (see the module docstring). tiling=(tm, tk, tn):
    the kernel's row, K-step and column tiles (powers of two); None: the
    tuned one for the kind and rows per group (``default_tiling``)."""
    lhs, codes, scales, group_sizes, zeros, group_size, tiling = _check(
        lhs, codes, scales, group_sizes, zeros, kind, group_size, tiling)
    out_dtype = dispatch.check_dtype("preferred_element_type",
                                     preferred_element_type or jnp.float32)
    impl, interpret = TABLE.resolve(implementation, interpret, kind=kind,
                                    group_size=group_size, tiling=tiling)
    if impl == "xla":
        return qgmm_reference(lhs, codes, scales, group_sizes, kind=kind, group_size=group_size,
                              zeros=zeros, preferred_element_type=out_dtype)
    tiling = tiling or default_tiling(kind, lhs.shape[0], codes.shape[0])
    cfg = _Config(kind, group_size, out_dtype, tiling, interpret)
    return _pallas_qgmm(lhs, codes, scales.astype(jnp.float32), group_sizes, zeros, cfg)
