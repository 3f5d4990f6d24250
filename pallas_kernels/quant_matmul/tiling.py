"""Block-size choice and zero padding shared by the quantised matmul kernels.

The kernels need every dimension to be a multiple of its block (Triton also
wants power-of-two blocks of at least 16 for dots); the wrappers pad operands
with zeros, which add nothing to the products, and slice the result.
"""
from __future__ import annotations

import jax.numpy as jnp

MIN_DOT = 16


def pow2_block(size: int, preferred: int) -> int:
    """The preferred block, shrunk to the next power of two >= size (min 16)."""
    b = MIN_DOT
    while b < size and b < preferred:
        b *= 2
    return b


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(x, shape):
    """Zero-pad x at the end of each axis up to shape."""
    pads = [(0, s - d) for s, d in zip(shape, x.shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def check_block(name: str, block: int) -> None:
    if block < MIN_DOT or block & (block - 1):
        raise ValueError(f"block size {name}={block} must be a power of two >= {MIN_DOT}")
