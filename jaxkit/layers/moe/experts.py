"""The experts' SwiGLU feed-forward math on the two layouts dispatch produces:
rows sorted by expert with group sizes (grouped matmul), or a dense
[E, C, D] buffer (batched matmul). Inputs are in the compute dtype; outputs
float32 so the weighted combine of k experts is accumulated in float32.

Expert matrices are float arrays, or jaxkit.quant.experts.LowBitExperts after
conversion to low-bit storage (quant mode 'int'): the grouped path hands
those to their grouped_matmul (the quantised grouped-matmul kernel), the
batched path dequantises them first."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxkit.quant.experts import LowBitExperts
from pallas_kernels.grouped_matmul import gmm


class ExpertWeights(NamedTuple):
    """Float arrays or LowBitExperts (mode 'int') of these logical shapes."""
    gate: jax.Array | LowBitExperts  # [E, D, H]
    up: jax.Array | LowBitExperts  # [E, D, H]
    down: jax.Array | LowBitExperts  # [E, H, D]


def group_sizes(sorted_expert, num_experts: int):
    """Rows per expert; ids >= num_experts (padding) are not counted."""
    return jnp.zeros((num_experts,), jnp.int32).at[sorted_expert].add(1, mode="drop")


def _ffn(x, w: ExpertWeights, mm, quant):
    """SwiGLU of x with matmul mm(a, b) -> float32; quant (or None) is a
    jaxkit.quant.ExpertQuant applied to the weights and around each matmul."""
    cd = x.dtype
    if quant is None:
        h = jax.nn.silu(mm(x, w.gate)) * mm(x, w.up)
        return mm(h.astype(cd), w.down)
    w = quant.weights(w)
    qmm = lambda a, b: quant.outputs(mm(a, b))
    x = quant.inputs(x).astype(cd)
    h = jax.nn.silu(qmm(x, w.gate)) * qmm(x, w.up)
    return qmm(quant.hidden(h).astype(cd), w.down)


def grouped_ffn(rows, sizes, w: ExpertWeights, *, implementation: str, quant=None):
    """rows [M, D] grouped by expert (sizes [E]) -> [M, D] float32; rows past
    sum(sizes) are padding and come out zero."""
    def mm(a, b):
        if isinstance(b, LowBitExperts):
            return b.grouped_matmul(a, sizes, implementation=implementation)
        return gmm(a, b.astype(a.dtype), sizes, implementation=implementation,
                   preferred_element_type=jnp.float32)
    return _ffn(rows, w, mm, quant)


def batched_ffn(x_e, w: ExpertWeights, *, quant=None):
    """x_e [E, C, D] -> [E, C, D] float32."""
    def mm(a, b):
        if isinstance(b, LowBitExperts):  # no batched quantised kernel: whole stacks
            b = b.dequantize()
        return jnp.einsum("ecd,edh->ech", a, b.astype(a.dtype),
                          preferred_element_type=jnp.float32)
    return _ffn(x_e, w, mm, quant)


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """All experts whose weights are at hand (every expert on one device, or
    this device's shard of them under expert parallelism)."""
    weights: ExpertWeights
    implementation: str
    quant: object = None  # jaxkit.quant.ExpertQuant, or None

    @property
    def num_experts(self) -> int:
        return self.weights.gate.shape[0]

    def grouped(self, rows, sorted_expert):
        """rows [M, D] sorted by expert id sorted_expert [M] -> [M, D] float32."""
        sizes = group_sizes(sorted_expert, self.num_experts)
        return grouped_ffn(rows, sizes, self.weights, implementation=self.implementation,
                           quant=self.quant)

    def buffered(self, x_e):
        """x_e [E, C, D] -> [E, C, D] float32."""
        return batched_ffn(x_e, self.weights, quant=self.quant)
