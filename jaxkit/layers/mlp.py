"""SwiGLU feed-forward block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.layers.linear import Linear


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, param_dtype, compute_dtype,
                 out_std: float | None = None, quant=None, target: str = "mlp"):
        kw = dict(rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype, quant=quant,
                  target=target)
        self.gate = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
        self.up = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
        self.down = Linear(hidden, d_model, axes=("mlp", "embed"), std=out_std, **kw)
        self.gate_up = nnx.data(None)  # gate|up as one Linear for generation (generate.fuse)

    def __call__(self, x):
        if self.gate_up is None:
            gate, up = self.gate(x), self.up(x)
        else:
            gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        return self.down(jax.nn.silu(gate) * up)
