"""Quantised matmuls in plain jnp: the specification every kernel follows.

Operands are already quantised; these functions fix the layouts. The 8-bit
weights are stored [N, K] (K contiguous, as Hopper's 8-bit wgmma needs both
operands K-major):

w8a8          xq int8 [M, K], xs f32 [M] (per token), wq int8 [N, K],
              ws f32 [N] (per output channel): out = (xq @ wq^T, exact int32)
              * xs[:, None] * ws[None, :].
fp8 blockwise xq e4m3 [M, K], xs f32 [M, ceil(K/128)] (1x128 blocks),
              wq e4m3 [N, K], ws f32 [ceil(N/128), ceil(K/128)] (128x128
              blocks): out = sum over K-blocks b of (xq_b @ wq_b^T, f32)
              * xs[:, b] * ws[n // 128, b].
int4 weight   x float [M, K], packed uint8 [N, K/2] (packing.py layout),
only          scales f32 [K/g, N] per group of g rows, optional zeros
              [K/g, N] (unsigned codes then): W = (q - zero) * scale, out = x @ W.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul.packing import unpack_int4
from pallas_kernels.shapes import cdiv

FP8_BLOCK = 128


def w8a8_reference(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16):
    acc = jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * xs[:, None] * ws[None, :]).astype(out_dtype)


def fp8_blockwise_reference(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16):
    M, K = xq.shape
    N = wq.shape[0]
    nk = cdiv(K, FP8_BLOCK)
    pad = nk * FP8_BLOCK - K
    x = jnp.pad(xq.astype(jnp.float32), ((0, 0), (0, pad))).reshape(M, nk, FP8_BLOCK)
    w = jnp.pad(wq.astype(jnp.float32), ((0, 0), (0, pad))).reshape(N, nk, FP8_BLOCK)
    partial = jnp.einsum("mbk,nbk->bmn", x, w, precision=jax.lax.Precision.HIGHEST)
    w_scale = jnp.repeat(ws, FP8_BLOCK, axis=0)[:N].T  # [nk, N]
    out = jnp.sum(partial * xs.T[:, :, None] * w_scale[:, None, :], axis=0)
    return out.astype(out_dtype)


def dequantize_int4(packed, scales, zeros=None, *, group_size: int):
    """float32 W [K, N] from the int4 weight-only layout."""
    q = unpack_int4(packed, signed=zeros is None).astype(jnp.float32)
    if zeros is not None:
        q = q - jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    return q * jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)


def int4_weight_only_reference(x, packed, scales, zeros=None, *, group_size: int, out_dtype=None):
    w = dequantize_int4(packed, scales, zeros, group_size=group_size)
    out = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return out.astype(out_dtype or x.dtype)
