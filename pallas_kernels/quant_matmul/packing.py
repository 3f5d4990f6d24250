"""Two int4 codes per byte.

Layout (transposed, K-pairs): for codes q [K, N] of a weight W [K, N], byte
p[n, i] holds q[2i, n] in its low nibble and q[2i + 1, n] in its high
nibble. These are exactly the bytes of a signed int4 array W^T [N, K] (XLA
packs int4 low nibble first), the K-major operand Hopper's Mosaic GPU kernel
converts two codes per instruction. A portable kernel reading a block of p
gets the even and the odd k of a K range and multiplies each with the
matching columns of x.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def pack_int4(codes):
    """int codes [K, N] in [-8, 7] or [0, 15] -> uint8 [N, K/2] (the low 4 bits
    of each code are kept, so both ranges unpack exactly with the matching
    ``signed``)."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] % 2:
        raise ValueError(f"pack_int4 needs [K, N] codes with even K, got shape {codes.shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"pack_int4 needs integer codes, got dtype {codes.dtype}")
    u = codes.T.astype(jnp.int32) & 0xF
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(jnp.uint8)


def unpack_nibbles(packed, *, signed: bool):
    """uint8 [..] -> (low, high) int32 nibble values, sign-extended when signed."""
    p = packed.astype(jnp.int32)
    lo, hi = p & 0xF, p >> 4
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    return lo, hi


# Magic-number dequantisation: a float whose mantissa step is 1 (bf16 in
# [128, 256), f16 in [1024, 2048), f32 in [2^23, 2^24)) holds base + v exactly
# when v is OR-ed into its low mantissa bits, so v costs one integer op and
# one exact float subtraction instead of an int-to-float conversion (a
# quarter-rate instruction on NVIDIA GPUs, and the bottleneck of decode).
_MAGIC = {  # float dtype -> (same-width int dtype, bit pattern of base, base)
    jnp.dtype(jnp.bfloat16): (jnp.int16, 0x4300, 128.0),
    jnp.dtype(jnp.float16): (jnp.int16, 0x6400, 1024.0),
    jnp.dtype(jnp.float32): (jnp.int32, 0x4B000000, 2.0 ** 23),
}


def unpack_nibbles_float(packed, dtype, *, signed: bool):
    """uint8 [..] -> (low, high) nibble values in float dtype (bf16, f16 or
    f32), equal to unpack_nibbles(...) converted, without int-to-float
    conversions. A signed nibble's low bits u satisfy u ^ 8 = q + 8."""
    if jnp.dtype(dtype) not in _MAGIC:
        raise ValueError(f"unpack_nibbles_float takes bfloat16, float16 or float32, got "
                         f"{jnp.dtype(dtype).name}")
    int_dtype, base_bits, base = _MAGIC[jnp.dtype(dtype)]
    p = packed.astype(int_dtype)  # zero-extends the bytes
    flip = 8 if signed else 0
    bits = base_bits | flip  # disjoint from the nibble's bits: XOR = OR (+ the sign flip)
    offset = base + flip

    def to_float(nibble):
        return lax.bitcast_convert_type(nibble ^ bits, dtype) - offset

    return to_float(p & 0xF), to_float(p >> 4)


def unpack_int4(packed, *, signed: bool = True):
    """uint8 [N, K/2] -> int8 codes [K, N] (inverse of pack_int4)."""
    lo, hi = unpack_nibbles(packed, signed=signed)
    return jnp.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1).T.astype(jnp.int8)
