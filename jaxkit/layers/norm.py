"""RMSNorm, computed in float32 whatever the activation dtype, through
pallas_kernels.rms_norm (the reference or its Pallas kernel)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxkit.sharding import per_shard
from pallas_kernels.rms_norm import add_rms_norm, rms_norm
from pallas_kernels.rms_norm.api import TABLE


def _row_axes(ndim: int) -> tuple:
    """Logical axes of an activation [batch, (length,) ..., dim] for a
    per-shard kernel: rows split as the batch and sequence are, never dim
    (a row's mean needs all of it)."""
    lead = ("batch", "length")[:ndim - 1]
    return (*lead, *(None,) * (ndim - len(lead)))


class RMSNorm(nnx.Module):
    """implementation: pallas_kernels.rms_norm's. Under a mesh a Pallas
    kernel, which XLA cannot partition, runs on each shard of rows."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
                 implementation: str = "auto"):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.implementation = implementation

    def __call__(self, x):
        """x [..., dim] -> normed, in x's dtype."""
        return self._run(rms_norm, x)

    def add(self, x, delta):
        """(x + delta in x's dtype, its norm): a residual add and the norm
        after it as one op."""
        return self._run(add_rms_norm, x, delta)

    def _run(self, op, *arrays):
        def call(*args):
            return op(*args, eps=self.eps, implementation=self.implementation)
        if TABLE.resolve(self.implementation, x=arrays[0]).name == "xla":
            return call(*arrays, self.scale[...])
        rows = _row_axes(arrays[0].ndim)
        return per_shard(call, in_axes=(rows,) * len(arrays) + ((None,),),
                         out_axes=rows)(*arrays, self.scale[...])
