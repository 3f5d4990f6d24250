"""The experts' SwiGLU feed-forward math on the two layouts dispatch produces:
rows sorted by expert with group sizes (grouped matmul), or a dense
[E, C, D] buffer (batched matmul). Inputs and outputs are in the compute
dtype, as for the dense MLP: the matmuls accumulate in float32, SiLU runs in
float32, and dispatch accumulates the weighted combine of k experts in
float32; a float32 [T * k, D] output would double the bytes every consumer
reads and make the backward's cotangents float32.

Expert matrices are float arrays, or jaxkit.quant.experts.LowBitExperts after
conversion to low-bit storage (quant mode 'int'): the grouped path hands
those to their grouped_matmul (the quantised grouped-matmul kernel), the
batched path dequantises them first."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxkit.layers.moe.permute import bincount
from jaxkit.quant.experts import LowBitExperts
from pallas_kernels.grouped_matmul import gmm


class ExpertWeights(NamedTuple):
    """Float arrays or LowBitExperts (mode 'int') of these logical shapes."""
    gate: jax.Array | LowBitExperts  # [E, D, H]
    up: jax.Array | LowBitExperts  # [E, D, H]
    down: jax.Array | LowBitExperts  # [E, H, D]


def group_sizes(sorted_expert, num_experts: int):
    """Rows per expert; ids >= num_experts (padding) are not counted."""
    return bincount(sorted_expert, num_experts)


def _swiglu(gate, up):
    f32 = lambda v: v.astype(jnp.float32)
    return jax.nn.silu(f32(gate)) * f32(up)


def _ffn(x, w: ExpertWeights, mm, quant):
    """SwiGLU of x with matmul mm(a, b) -> a.dtype; quant (or None) is a
    jaxkit.quant.ExpertQuant applied to the weights and around each matmul."""
    cd = x.dtype
    if quant is None:
        if isinstance(w.gate, LowBitExperts):
            gate, up = mm(x, w.gate), mm(x, w.up)
        else:
            # One matmul for gate and up: twice the columns per expert keeps the
            # grouped matmul's tiles fuller, reads the rows once and its backward
            # yields dx in one product instead of a sum of two.
            gate, up = jnp.split(mm(x, jnp.concatenate([w.gate, w.up], axis=-1)), 2, axis=-1)
        return mm(_swiglu(gate, up).astype(cd), w.down)
    w = quant.weights(w)
    qmm = lambda a, b: quant.outputs(mm(a, b))
    x = quant.inputs(x).astype(cd)
    h = _swiglu(qmm(x, w.gate), qmm(x, w.up))
    return qmm(quant.hidden(h).astype(cd), w.down)


def grouped_ffn(rows, sizes, w: ExpertWeights, *, implementation: str, quant=None,
                consumers: int = 1, pingpong: bool = False):
    """rows [M, D] grouped by expert (sizes [E]) -> [M, D] in rows.dtype; rows
    past sum(sizes) are padding and come out zero. consumers, pingpong: the
    float grouped matmuls' (pallas_kernels.grouped_matmul.gmm)."""
    def mm(a, b):
        if isinstance(b, LowBitExperts):  # the quantised kernels give float32
            if consumers != 1 or pingpong:
                raise ValueError(f"model.moe.gmm_consumers={consumers} and gmm_pingpong="
                                 f"{pingpong} apply to float expert weights; low-bit experts "
                                 "run the quantised grouped matmul")
            return b.grouped_matmul(a, sizes, implementation=implementation).astype(a.dtype)
        return gmm(a, b.astype(a.dtype), sizes, implementation=implementation,
                   preferred_element_type=a.dtype, consumers=consumers, pingpong=pingpong)
    return _ffn(rows, w, mm, quant)


def batched_ffn(x_e, w: ExpertWeights, *, quant=None):
    """x_e [E, C, D] -> [E, C, D] in x_e.dtype."""
    def mm(a, b):
        if isinstance(b, LowBitExperts):  # no batched quantised kernel: whole stacks
            b = b.dequantize()
        return jnp.einsum("ecd,edh->ech", a, b.astype(a.dtype), preferred_element_type=a.dtype)
    return _ffn(x_e, w, mm, quant)


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """All experts whose weights are at hand (every expert on one device, or
    this device's shard of them under expert parallelism)."""
    weights: ExpertWeights
    implementation: str
    quant: object = None  # jaxkit.quant.ExpertQuant, or None
    consumers: int = 1  # the grouped matmuls' warpgroups (model.moe.gmm_consumers)
    pingpong: bool = False  # model.moe.gmm_pingpong

    @property
    def num_experts(self) -> int:
        return self.weights.gate.shape[0]

    def grouped(self, rows, sorted_expert):
        """rows [M, D] sorted by expert id sorted_expert [M] -> [M, D] in rows.dtype."""
        sizes = group_sizes(sorted_expert, self.num_experts)
        return grouped_ffn(rows, sizes, self.weights, implementation=self.implementation,
                           quant=self.quant, consumers=self.consumers, pingpong=self.pingpong)

    def buffered(self, x_e):
        """x_e [E, C, D] -> [E, C, D] in x_e.dtype."""
        return batched_ffn(x_e, self.weights, quant=self.quant)
