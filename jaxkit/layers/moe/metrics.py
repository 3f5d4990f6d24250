"""Routing statistics, the auxiliary losses built from them, and the
aux-loss-free bias update.

A forward pass first produces additive token-level sums (`RoutingStats`), so
that under data/expert parallelism a psum over the token-sharding mesh axes
gives exactly the statistics of the whole batch; losses and metrics are then
computed once from the summed statistics.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RoutingStats(NamedTuple):
    counts: jax.Array  # [E] assignments routed to each expert (before any dropping)
    prob_sum: jax.Array  # [E] router probability summed over tokens
    z_sum: jax.Array  # sum over tokens of logsumexp(logits)^2
    dropped: jax.Array  # assignments dropped (token choice) or tokens no expert chose
    units: jax.Array  # what `dropped` counts out of: T * k assignments, or T tokens
    tokens: jax.Array


def routing_stats(logits, probs, counts, dropped, units) -> RoutingStats:
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return RoutingStats(counts=jax.lax.stop_gradient(f32(counts)), prob_sum=jnp.sum(probs, axis=0),
                        z_sum=jnp.sum(lse * lse), dropped=f32(dropped), units=f32(units),
                        tokens=f32(logits.shape[0]))


def summarize(stats: RoutingStats, *, aux_loss_weight: float, z_loss_weight: float):
    """-> (weighted loss, metrics). aux_loss = E * sum_e f_e * P_e with f_e the
    fraction of assignments routed to e and P_e its mean router probability (1
    when balanced); z_loss = mean logsumexp(logits)^2. Metrics hold the
    unweighted values."""
    num_experts = stats.counts.shape[0]
    load = stats.counts / jnp.maximum(jnp.sum(stats.counts), 1.0)
    aux = num_experts * jnp.sum(load * stats.prob_sum / stats.tokens)
    z = stats.z_sum / stats.tokens
    loss = aux_loss_weight * aux + z_loss_weight * z
    # entropy of the load over experts, over its maximum log(E): 1 when balanced
    entropy = -jnp.sum(jnp.where(load > 0, load * jnp.log(jnp.maximum(load, 1e-30)), 0.0))
    metrics = {"load": load, "max_mean_load": jnp.max(load) * num_experts,
               "load_entropy": entropy / jnp.log(float(max(num_experts, 2))),
               "dropped_fraction": stats.dropped / stats.units, "aux_loss": aux, "z_loss": z}
    return loss.astype(jnp.float32), metrics


def balance_bias_update(bias, load, rate: float):
    """bias_e += rate * sign(mean load - load_e): under-loaded experts become
    more likely to be chosen, over-loaded ones less."""
    return bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)
