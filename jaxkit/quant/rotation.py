"""Randomised Hadamard rotation of the contraction dimension.

R = D H / sqrt(b): D a random +-1 diagonal, H the Sylvester Hadamard matrix of
size b, applied block-diagonally when the dimension n is not a power of two (b
is then the largest power of two dividing n). R is orthogonal, so
(x R)(R^T W) = x W exactly in real arithmetic, while the rotated operands have
their outliers spread over the block, which shrinks quantisation scales.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def hadamard_block_size(n: int) -> int:
    """Largest power of two dividing n (the Hadamard block used for n)."""
    if n < 2:
        raise ValueError(f"cannot rotate a dimension of size {n}")
    b = n & -n
    if b < 2:
        raise ValueError(f"dimension {n} is odd: no Hadamard block (power of two > 1) divides it")
    return b


@functools.lru_cache(maxsize=None)
def sylvester(n: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of size n (a power of two), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


# Largest block that a 16-bit input multiplies by H_b in one matmul (2 * b
# flops an element, a bf16 GEMM); larger blocks take the Kronecker pair.
DIRECT_BLOCK = 256


@functools.partial(jax.jit, static_argnames=("axis", "block", "dtype"))
def fwht(x, axis: int = -1, block: int | None = None, dtype=None):
    """Unnormalised Walsh-Hadamard transform along ``axis`` in blocks of
    ``block`` (default: the whole axis, which must then be a power of two),
    returned in ``dtype`` (default x's).

    A bfloat16/float16 x with a block of at most DIRECT_BLOCK is multiplied by
    H_b in one matmul: its values times +-1 are exact in 16-bit operands and
    the sums accumulate in float32, so the result is exact up to float32
    summation order. Otherwise H_b is the Kronecker product H_a (x) H_c (a, c
    powers of two, a * c = b) and each block, viewed as [a, c], is multiplied
    by H_c along its columns and by H_a along its rows at HIGHEST precision,
    the intermediate in float32: two passes over x where the butterfly's
    log2(b) stages were a pass each (XLA fuses a stage, not the chain)."""
    dtype = x.dtype if dtype is None else dtype
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    block = n if block is None else block
    if block & (block - 1) or n % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing {n}")
    lead = x.shape[:-1]
    if x.dtype.itemsize == 2 and block <= DIRECT_BLOCK:
        y = jnp.einsum("...c,cd->...d", x.reshape(*lead, n // block, block),
                       jnp.asarray(sylvester(block), x.dtype), preferred_element_type=jnp.float32)
    else:
        a = 1 << ((block.bit_length() - 1) // 2)
        y = x.reshape(*lead, n // block, a, block // a)
        for spec, h in (("...ac,cd->...ad", sylvester(block // a)), ("...ad,ae->...ed", sylvester(a))):
            y = jnp.einsum(spec, y, jnp.asarray(h, y.dtype), precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
    return jnp.moveaxis(y.reshape(*lead, n).astype(dtype), -1, axis)


def random_signs(key, n: int) -> jax.Array:
    """The random +-1 diagonal D, float32 [n]."""
    return jax.random.rademacher(key, (n,), jnp.float32)


def _rotate(x, signs, axis: int):
    n = x.shape[axis]
    if signs.shape != (n,):
        raise ValueError(f"signs of shape {signs.shape} do not match dimension {n} (axis {axis})")
    b = hadamard_block_size(n)
    shape = [1] * x.ndim
    shape[axis] = n
    y = fwht(x * signs.reshape(shape).astype(x.dtype), axis=axis, block=b, dtype=jnp.float32)
    return y * b ** -0.5


@jax.jit
def rotate_activation(x, signs):
    """x R along the last axis (x [..., n]), float32. A bfloat16 x is rotated
    exactly by a bf16 GEMM (fwht), which is what keeps fake-quantised training
    with rotations near bf16 speed; its gradient is computed at x's precision."""
    return _rotate(x, signs, x.ndim - 1)


@jax.jit
def rotate_weight(w, signs):
    """R^T W for W [n, out]: rotates the contraction axis 0 so that
    rotate_activation(x) @ rotate_weight(W) == x @ W; float32."""
    return _rotate(w, signs, 0)
