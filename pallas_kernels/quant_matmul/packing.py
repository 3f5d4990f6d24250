"""Two int4 codes per byte.

Layout (half-split along K): for codes q [K, N], byte p[i, n] holds q[i, n] in
its low nibble and q[i + K/2, n] in its high nibble. A kernel that reads rows
[i0, i0 + t) of p therefore gets two contiguous K ranges, [i0, i0 + t) and
[K/2 + i0, K/2 + i0 + t), and needs no interleaving: it multiplies each with
the matching slice of x.
"""
from __future__ import annotations

import jax.numpy as jnp


def pack_int4(codes):
    """int codes [K, N] in [-8, 7] or [0, 15] -> uint8 [K/2, N] (the low 4 bits
    of each code are kept, so both ranges unpack exactly with the matching
    ``signed``)."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] % 2:
        raise ValueError(f"pack_int4 needs [K, N] codes with even K, got shape {codes.shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"pack_int4 needs integer codes, got dtype {codes.dtype}")
    u = codes.astype(jnp.int32) & 0xF
    half = codes.shape[0] // 2
    return (u[:half] | (u[half:] << 4)).astype(jnp.uint8)


def unpack_nibbles(packed, *, signed: bool):
    """uint8 [..] -> (low, high) int32 nibble values, sign-extended when signed."""
    p = packed.astype(jnp.int32)
    lo, hi = p & 0xF, p >> 4
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    return lo, hi


def unpack_int4(packed, *, signed: bool = True):
    """uint8 [K/2, N] -> int8 codes [K, N] (inverse of pack_int4)."""
    lo, hi = unpack_nibbles(packed, signed=signed)
    return jnp.concatenate([lo, hi], axis=0).astype(jnp.int8)
