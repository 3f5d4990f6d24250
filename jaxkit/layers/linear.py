"""Dense projection, the one place every matmul of the model goes through, so
quantization can be switched on for any projection by config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], *, std: float, dtype) -> nnx.Param:
    """A normally initialised parameter carrying its logical axis names, which
    jaxkit.sharding maps to mesh axes."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ W, W [in, out] stored in param_dtype, computed in compute_dtype."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                 std: float | None = None):
        std = in_features ** -0.5 if std is None else std
        self.kernel = param(rngs, (in_features, out_features), axes, std=std, dtype=param_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...].astype(self.compute_dtype)
        return jnp.dot(x.astype(self.compute_dtype), w, preferred_element_type=jnp.float32
                       ).astype(self.compute_dtype)
