"""Shape arithmetic shared by the kernel wrappers: ceil division, rounding up
and zero padding to a block multiple (padding adds nothing to the products;
the wrappers slice the result)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def cdiv(a, b):
    """ceil(a / b) for a >= 0 and b > 0. Python (and numpy) ints give an int;
    a jax value lowers to the one division lax.div(a + (b - 1), b), the form
    the Mosaic GPU kernels compute block bounds in."""
    if isinstance(a, jax.Array):
        return lax.div(a + (b - 1), b)
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is >= n."""
    return cdiv(n, multiple) * multiple


def pad_to(x, shape, mode: str = "constant"):
    """x padded at the end of each axis up to ``shape`` (x itself when it
    already has it); ``mode`` as in jnp.pad ('edge' repeats the last entry)."""
    pads = [(0, s - d) for s, d in zip(shape, x.shape, strict=True)]
    return jnp.pad(x, pads, mode=mode) if any(p for _, p in pads) else x


def pad_axis_to_multiple(x, axis: int, multiple: int, mode: str = "constant"):
    """x padded at the end of one axis up to a multiple of ``multiple``."""
    shape = list(x.shape)
    shape[axis] = round_up(shape[axis], multiple)
    return pad_to(x, shape, mode)
