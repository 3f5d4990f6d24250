"""Dispatch: move each token to its experts and combine the results.

`experts` is a LocalExperts (or its expert-parallel wrapper) with
grouped(rows, sorted_expert) and buffered(x_e); dispatch never needs to know
where the experts live. Rows move by gathers in both directions
(permute.py), except for expert choice's sums over a token's copies; no
scatter of rows into place, no one-hot dispatch maps. Everything runs
under the name scope "moe_dispatch", by which a profile attributes its kernels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkit.layers.moe.permute import (add_rows, bincount, combine_rows, gather_rows, sort_ids,
                                       take_rows)
from jaxkit.layers.moe.routers import ExpertChoice, TokenChoice


@jax.named_scope("moe_dispatch")
def dropless(x, route: TokenChoice, experts, permute: str = "auto"):
    """Every assignment is computed: sort the T * k (token, expert) pairs by
    expert, run the grouped matmul, un-sort and sum with the router weights.
    x [T, D] -> [T, D] float32. permute: the row gathers' implementation."""
    T, k = route.expert.shape
    s = sort_ids(route.expert.reshape(-1))
    slot = s.inverse.reshape(T, k)  # sorted row of every (token, choice)
    y = experts.grouped(take_rows(x, s.order // k, slot, permute), s.ids)
    return combine_rows(y, slot, route.weight, s.order, permute)


@jax.named_scope("moe_dispatch")
def capacity(x, route: TokenChoice, num_experts: int, slots: int, experts,
             permute: str = "auto"):
    """Each expert has `slots` places; first choices are placed before second
    choices (then in token order) and assignments past the last slot are
    dropped. Returns (y [T, D] float32, number of kept assignments).
    permute: the row gathers' implementation."""
    T, k = route.expert.shape
    E, C = num_experts, slots
    by_priority = route.expert.T.reshape(-1)  # entry j * T + t: choice j of token t
    s = sort_ids(by_priority)
    sizes = bincount(s.ids, E)
    starts = jnp.cumsum(sizes) - sizes
    position = (s.inverse - starts[by_priority]).reshape(k, T).T  # [T, k] place in its expert
    kept = position < C
    slot = jnp.where(kept, route.expert * C + position, E * C)
    place = jnp.arange(C)
    filled = place < sizes[:, None]  # [E, C]
    choice, token = jnp.divmod(jnp.take(s.order, starts[:, None] + place, mode="clip"), T)
    token = jnp.where(filled, token, T)
    source = jnp.where(filled, token * k + choice, T * k)
    x_e = take_rows(x, token.reshape(-1), slot, permute).reshape(E, C, x.shape[1])
    y = experts.buffered(x_e).reshape(E * C, -1)
    return combine_rows(y, slot, route.weight, source.reshape(-1), permute), jnp.sum(kept)


@jax.named_scope("moe_dispatch")
def chosen_by_experts(x, route: ExpertChoice, experts):
    """Expert-choice routing. Returns (y [T, D] float32, number of tokens that
    no expert chose)."""
    T = x.shape[0]
    y = experts.buffered(gather_rows(x, route.token))  # [E, c, D]
    out = add_rows(route.weight[..., None] * y.astype(jnp.float32), route.token, T)
    chosen = jnp.zeros((T,), jnp.bool_).at[route.token].set(True)
    return out, T - jnp.sum(chosen)
