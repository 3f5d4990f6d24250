"""Rounding a float32 array onto an element type's grid, in plain jnp.

The rule for floats: find the binade of |v| (no lower than the smallest
normal exponent, which gives the subnormals their fixed spacing), round to a
multiple of that binade's spacing, then saturate at the largest finite value.
Every step is exact in float32 for the formats here, so round-to-nearest
gives what an IEEE round-to-nearest-even cast with saturation gives.

Rounding modes of the grid step:

* 'nearest'     ties to even;
* 'up'          away from zero (the smallest grid magnitude >= |v|);
* 'stochastic'  down or up to the two neighbouring grid values, up with
                probability equal to the distance from the lower one in
                units of the spacing, from ``noise`` uniform in [0, 1): the
                expected result is v exactly for v inside +-element.max
                (beyond it the result saturates, as round-to-nearest does).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxkit.quant.formats import Element

ROUNDINGS = ("nearest", "up", "stochastic")


def round_grid(t, rounding: str = "nearest", noise=None):
    """t rounded to an integer in a rounding mode (module docstring); noise:
    uniform [0, 1) of t's shape, for 'stochastic' only."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    if (noise is None) != (rounding != "stochastic"):
        raise ValueError(f"rounding {rounding!r} {'needs' if noise is None else 'takes no'} "
                         "noise")
    if rounding == "nearest":
        return jnp.round(t)
    if rounding == "up":
        return jnp.where(t < 0, jnp.floor(t), jnp.ceil(t))
    return jnp.floor(t + noise)


def round_to_element(v, element: Element, rounding: str = "nearest", noise=None):
    """v on the element's grid in a rounding mode (module docstring),
    saturating at +-element.max."""
    v = jnp.asarray(v, jnp.float32)
    if element.kind == "int":
        codes = jnp.clip(round_grid(v / element.step, rounding, noise), element.qmin, element.qmax)
        return codes * element.step
    a = jnp.abs(v)
    _, e = jnp.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
    e = jnp.maximum(e - 1, element.min_exp)
    spacing = jnp.ldexp(jnp.float32(1.0), e - element.mbits)
    # the magnitude is rounded (symmetric about zero, so stochastic stays unbiased)
    r = jnp.minimum(round_grid(a / spacing, rounding, noise) * spacing, element.max)
    return jnp.where(v < 0, -r, r)


def floor_log2(a):
    """floor(log2(a)) for positive finite float32 a, exactly (int32)."""
    _, e = jnp.frexp(a)
    return e - 1
