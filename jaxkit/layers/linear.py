"""Dense projection, the one place every matmul of the model goes through, so
quantization can be switched on for any projection by config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import QuantConfig
from jaxkit.quant.config_check import TARGETS
from jaxkit.quant.layer import Quantizer


def param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], *, std: float, dtype) -> nnx.Param:
    """A normally initialised parameter carrying its logical axis names, which
    jaxkit.sharding maps to mesh axes."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ W, W [in, out] stored in param_dtype, computed in compute_dtype.

    quant/target: when ``quant`` has a mode other than 'none' and names
    ``target`` ('q', 'k', 'v', 'o', 'mlp', 'experts', 'head') among its
    targets, a jaxkit.quant.Quantizer applies it (QAT/PTQ fake quantisation,
    or low-bit storage after jaxkit.quant.quantize_model, which sets kernel to
    None).

    sparsity: None, or what jaxkit.sparsity.sparsify_linears sets (an
    NMSparsity): a callable that maps the kernel to the N:M pruned weight
    every matmul of the layer uses, dense or through the quantizer."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                 std: float | None = None, quant: QuantConfig | None = None,
                 target: str | None = None):
        std = in_features ** -0.5 if std is None else std
        self.kernel = param(rngs, (in_features, out_features), axes, std=std, dtype=param_dtype)
        self.compute_dtype = compute_dtype
        if target is not None and target not in TARGETS:
            raise ValueError(f"unknown Linear target {target!r}; valid targets: {TARGETS}")
        self.target = target
        active = quant is not None and quant.mode != "none" and target in quant.targets
        self.quantizer = Quantizer(in_features, out_features, quant, rngs=rngs) if active \
            else nnx.data(None)
        self.sparsity = None

    def weight(self) -> jax.Array | None:
        """The float kernel as the matmul uses it (N:M pruned when sparse), or
        None once converted to low-bit storage."""
        if self.kernel is None:
            return None
        kernel = self.kernel[...]
        return kernel if self.sparsity is None else self.sparsity(kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantizer is not None:
            return self.quantizer(x, self.weight(), self.compute_dtype)
        # Output in the compute dtype (the GEMM still accumulates in float32):
        # a float32 output would make the backward's cotangent float32 and turn
        # both gradient matmuls into float32 GEMMs.
        w = self.weight().astype(self.compute_dtype)
        return jnp.dot(x.astype(self.compute_dtype), w)
