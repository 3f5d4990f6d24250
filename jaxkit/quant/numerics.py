"""Rounding a float32 array onto an element type's grid, in plain jnp.

The rule for floats: find the binade of |v| (no lower than the smallest
normal exponent, which gives the subnormals their fixed spacing), round to the
nearest multiple of that binade's spacing with ties to even, then saturate at
the largest finite value. Every step is exact in float32 for the formats here,
so the result is what an IEEE round-to-nearest-even cast with saturation gives.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxkit.quant.formats import Element


def round_to_element(v, element: Element):
    """Nearest element value (ties to even), saturating at +-element.max."""
    v = jnp.asarray(v, jnp.float32)
    if element.kind == "int":
        codes = jnp.clip(jnp.round(v / element.step), element.qmin, element.qmax)
        return codes * element.step
    a = jnp.abs(v)
    _, e = jnp.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
    e = jnp.maximum(e - 1, element.min_exp)
    spacing = jnp.ldexp(jnp.float32(1.0), e - element.mbits)
    r = jnp.minimum(jnp.round(a / spacing) * spacing, element.max)
    return jnp.where(v < 0, -r, r)


def floor_log2(a):
    """floor(log2(a)) for positive finite float32 a, exactly (int32)."""
    _, e = jnp.frexp(a)
    return e - 1
