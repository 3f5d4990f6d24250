"""The experts' SwiGLU feed-forward math on the two layouts dispatch produces:
rows sorted by expert with group sizes (grouped matmul), or a dense
[E, C, D] buffer (batched matmul). Inputs are in the compute dtype; outputs
float32 so the weighted combine of k experts is accumulated in float32."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import gmm


class ExpertWeights(NamedTuple):
    gate: jax.Array  # [E, D, H]
    up: jax.Array  # [E, D, H]
    down: jax.Array  # [E, H, D]


def group_sizes(sorted_expert, num_experts: int):
    """Rows per expert; ids >= num_experts (padding) are not counted."""
    return jnp.zeros((num_experts,), jnp.int32).at[sorted_expert].add(1, mode="drop")


def grouped_ffn(rows, sizes, w: ExpertWeights, *, implementation: str):
    """rows [M, D] grouped by expert (sizes [E]) -> [M, D] float32; rows past
    sum(sizes) are padding and come out zero."""
    cd = rows.dtype
    mm = lambda a, b: gmm(a, b.astype(cd), sizes, implementation=implementation,
                          preferred_element_type=jnp.float32)
    h = jax.nn.silu(mm(rows, w.gate)) * mm(rows, w.up)
    return mm(h.astype(cd), w.down)


def batched_ffn(x_e, w: ExpertWeights):
    cd = x_e.dtype
    mm = lambda a, b: jnp.einsum("ecd,edh->ech", a, b.astype(cd), preferred_element_type=jnp.float32)
    h = jax.nn.silu(mm(x_e, w.gate)) * mm(x_e, w.up)
    return mm(h.astype(cd), w.down)


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """All experts whose weights are at hand (every expert on one device, or
    this device's shard of them under expert parallelism)."""
    weights: ExpertWeights
    implementation: str

    @property
    def num_experts(self) -> int:
        return self.weights.gate.shape[0]

    def grouped(self, rows, sorted_expert):
        """rows [M, D] sorted by expert id sorted_expert [M] -> [M, D] float32."""
        sizes = group_sizes(sorted_expert, self.num_experts)
        return grouped_ffn(rows, sizes, self.weights, implementation=self.implementation)

    def buffered(self, x_e):
        """x_e [E, C, D] -> [E, C, D] float32."""
        return batched_ffn(x_e, self.weights)
