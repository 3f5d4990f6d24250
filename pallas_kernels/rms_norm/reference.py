"""Pure-jnp RMSNorm and the residual add fused with it: the specification
every implementation is tested against.

x [..., D] is normalised over its last dimension in float32 and scaled by
scale [D]; the result has x's dtype:

    y = x / sqrt(mean(x**2) + eps) * scale

add_rms_norm is a residual add followed by the next layer's norm, as a
pre-norm transformer block runs them: the sum is formed in x's dtype (as
the residual stream stores it) and that rounded sum is normalised.
"""
from __future__ import annotations

import jax.numpy as jnp


def rms_norm(x, scale, eps):
    """RMSNorm of x [..., D] with scale [D] -> [..., D] in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps))
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm(x, delta, scale, eps):
    """-> (x + delta in x.dtype, rms_norm of that sum)."""
    total = (x + delta).astype(x.dtype)
    return total, rms_norm(total, scale, eps)


def rms_norm_bytes(rows: int, dim: int, itemsize: int, *, add: bool = False,
                   with_backward: bool = False) -> int:
    """Bytes a fused implementation must move for [rows, dim] inputs of
    ``itemsize`` bytes. Forward: x (and delta) read, y (and the sum)
    written. Backward: x (or the sum) and the output cotangent(s) read, dx
    written, and the forward's per-row float32 rstd written and read back.
    The [dim] vectors (scale, partial d-scale sums) are left out."""
    arrays = 4 if add else 2
    if not with_backward:
        return rows * dim * itemsize * arrays
    arrays += 4 if add else 3
    return rows * (dim * itemsize * arrays + 2 * 4)
