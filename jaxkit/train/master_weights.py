"""Float32 master weights for low-precision parameters (optimizer.master_weights).

The model's parameters are stored in bfloat16 (model.param_dtype), so its
matmuls read them as they are and their gradients come back in bfloat16: no
float32 -> bfloat16 cast of every weight in the forward and no widening of
every weight gradient in the backward. The optimizer keeps float32 copies
(the master weights) in its state and runs its inner transformation on
them; after each update the parameters are the new master weights rounded
to their dtype, so small updates accumulate in float32 instead of being
rounded away against bfloat16 weights.

What leaves a run is its bfloat16 parameters (export, evaluation,
generation, and train.init_from, whose new master weights start from them);
the master weights live in the checkpoints' optimizer state, so a resume
continues them exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MasterWeightsState(NamedTuple):
    master: optax.Params  # float32 copies of the parameters
    inner: optax.OptState  # the inner transformation's state, over the master weights


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on float32 master copies of the parameters. Its updates
    apply to the master weights (state.master already holds them applied);
    `apply_update` gives the parameters that follow."""

    def init(params):
        master = optax.tree.cast(params, jnp.float32)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params=None):
        del params  # the inner transformation sees the master weights
        grads = optax.tree.cast(grads, jnp.float32)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        return updates, MasterWeightsState(optax.apply_updates(state.master, updates), inner_state)

    return optax.GradientTransformation(init, update)


def apply_update(optimizer: optax.GradientTransformation, grads, opt_state, params):
    """(params, opt_state) after one step of `optimizer`: with master weights
    the parameters are the new master weights rounded to their dtypes, else
    params + updates."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    if isinstance(opt_state, MasterWeightsState):
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params), opt_state
    return optax.apply_updates(params, updates), opt_state
