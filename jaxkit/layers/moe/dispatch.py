"""Dispatch: move each token to its experts and combine the results.

`experts` is a LocalExperts (or its expert-parallel wrapper) with
grouped(rows, sorted_expert) and buffered(x_e); dispatch never needs to know
where the experts live.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkit.layers.moe.routers import ExpertChoice, TokenChoice


def dropless(x, route: TokenChoice, experts):
    """Every assignment is computed: sort the T * k (token, expert) pairs by
    expert, run the grouped matmul, un-sort and sum with the router weights.
    x [T, D] -> [T, D] float32."""
    T, k = route.expert.shape
    flat = route.expert.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    y_sorted = experts.grouped(x[order // k], flat[order])
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, k, -1)
    return jnp.einsum("tkd,tk->td", y, route.weight)


def _buffered(x, dispatch, combine, experts):
    """dispatch/combine [T, E, C] one-hot (weighted) slot maps."""
    x_e = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)
    return jnp.einsum("tec,ecd->td", combine, experts.buffered(x_e))


def capacity(x, route: TokenChoice, num_experts: int, slots: int, experts):
    """Each expert has `slots` places; first choices are placed before second
    choices (then in token order) and assignments past the last slot are
    dropped. Returns (y [T, D] float32, number of kept assignments).
    The one-hot maps take O(T * E * slots) memory: for many tokens per
    device prefer dropless."""
    T, k = route.expert.shape
    onehot = jax.nn.one_hot(route.expert, num_experts, dtype=jnp.int32)  # [T, k, E]
    by_priority = onehot.transpose(1, 0, 2).reshape(k * T, num_experts)
    position = (jnp.cumsum(by_priority, axis=0) - 1).reshape(k, T, num_experts).transpose(1, 0, 2)
    position = jnp.sum(position * onehot, axis=-1)  # [T, k] slot within the chosen expert
    slot = jax.nn.one_hot(position, slots, dtype=jnp.float32)  # all-zero past the last slot
    onehot = onehot.astype(jnp.float32)
    dispatch = jnp.einsum("tke,tkc->tec", onehot, slot)
    combine = jnp.einsum("tke,tkc,tk->tec", onehot, slot, route.weight)
    return _buffered(x, dispatch, combine, experts), jnp.sum(position < slots)


def chosen_by_experts(x, route: ExpertChoice, experts):
    """Expert-choice routing. Returns (y [T, D] float32, number of tokens that
    no expert chose)."""
    T = x.shape[0]
    dispatch = jax.nn.one_hot(route.token, T, dtype=jnp.float32).transpose(2, 0, 1)  # [T, E, c]
    combine = dispatch * route.weight[None]
    unchosen = jnp.sum(jnp.sum(dispatch, axis=(1, 2)) == 0)
    return _buffered(x, dispatch, combine, experts), unchosen
