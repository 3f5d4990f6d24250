"""Block-size choice shared by the quantised matmul kernels: Triton wants
power-of-two blocks of at least 16 for dots, and the wrappers zero-pad every
dimension to a whole number of blocks (pallas_kernels.shapes), which adds
nothing to the products, then slice the result.
"""
from __future__ import annotations

MIN_DOT = 16


def pow2_block(size: int, preferred: int) -> int:
    """The preferred block, shrunk to the next power of two >= size (min 16)."""
    b = MIN_DOT
    while b < size and b < preferred:
        b *= 2
    return b


def check_block(name: str, block: int) -> None:
    if block < MIN_DOT or block & (block - 1):
        raise ValueError(f"block size {name}={block} must be a power of two >= {MIN_DOT}")
