"""Quantised-weight grouped matmul in plain jnp: the specification.

qgmm(lhs [M, K] float, codes, scales [G, K/gs, N] float32, group_sizes [G])
-> [M, N] float32: rows of group g (grouped contiguously, as in
pallas_kernels.grouped_matmul) times the dequantised weight W[g] [K, N];
rows past sum(group_sizes) give zeros.

Weight layouts (``kind``), for codes q[g, k, n] and group size gs:
  'int8'  codes int8 [G, K, N];          W = q * scale
  'fp8'   codes float8_e4m3fn [G, K, N]; W = q * scale
  'int4'  codes uint8 [G, N, K/2], per group the layout of
          pallas_kernels.quant_matmul.packing (pack_int4 of q[g]: byte [n, i]
          holds k = 2i in its low nibble and k = 2i + 1 in its high one, a
          signed int4 W[g]^T); W = q * scale, or (q - zero) * scale with
          unsigned codes in [0, 15] when zero points ``zeros`` [G, K/gs, N]
          are given.
scale[g, b, n] covers rows k in [b * gs, (b + 1) * gs) of column n:
gs = K is one scale per output channel (per-channel int8), gs = 128 the
1x128 blocks of fp8.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import gmm_reference
from pallas_kernels.quant_matmul.packing import pack_int4
from pallas_kernels.quant_matmul.reference import dequantize_int4

KINDS = ("int8", "int4", "fp8")
CODE_DTYPES = {"int8": jnp.dtype(jnp.int8), "int4": jnp.dtype(jnp.uint8),
               "fp8": jnp.dtype(jnp.float8_e4m3fn)}


def pack_int4_groups(codes):
    """int codes [G, K, N] -> uint8 [G, N, K/2] (the 'int4' layout)."""
    return jax.vmap(pack_int4)(codes)


def dequantize_groups(codes, scales, zeros=None, *, kind: str, group_size: int):
    """float32 W [G, K, N] from one of the layouts above."""
    if kind == "int4":
        return jax.vmap(lambda p, s, z: dequantize_int4(p, s, z, group_size=group_size),
                        in_axes=(0, 0, None if zeros is None else 0))(codes, scales, zeros)
    return codes.astype(jnp.float32) * jnp.repeat(scales.astype(jnp.float32), group_size, axis=1)


def qgmm_reference(lhs, codes, scales, group_sizes, *, kind: str, group_size: int, zeros=None,
                   preferred_element_type=jnp.float32):
    """lhs [M, K] x dequantised W [G, K, N] by groups of rows -> [M, N]."""
    w = dequantize_groups(codes, scales, zeros, kind=kind, group_size=group_size)
    return gmm_reference(lhs.astype(jnp.float32), w, group_sizes,
                         preferred_element_type=preferred_element_type)
