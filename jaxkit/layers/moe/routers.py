"""Routers: pure functions from router logits to an assignment of tokens to
experts. Token-choice routers give every token k experts; the expert-choice
router gives every expert a fixed number of tokens."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenChoice(NamedTuple):
    expert: jax.Array  # [T, k] int32, chosen experts, best first
    weight: jax.Array  # [T, k] float32 combine weights
    probs: jax.Array  # [T, E] float32 router probabilities (for the load-balancing loss)


class ExpertChoice(NamedTuple):
    token: jax.Array  # [E, c] int32, tokens chosen by each expert, best first
    weight: jax.Array  # [E, c] float32 combine weights
    probs: jax.Array  # [T, E] float32


def _check_k(k: int, num_experts: int) -> None:
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {k}")


def _normalize(w):
    return w / jnp.sum(w, axis=-1, keepdims=True)


def topk_softmax(logits, k: int, *, renormalize: bool) -> TokenChoice:
    """Softmax over experts, keep the k largest; renormalize rescales the kept
    probabilities to sum to 1 (Mixtral), otherwise they are used as they are (Switch)."""
    _check_k(k, logits.shape[-1])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weight, expert = jax.lax.top_k(probs, k)
    return TokenChoice(expert.astype(jnp.int32), _normalize(weight) if renormalize else weight, probs)


def sigmoid_bias(logits, bias, k: int) -> TokenChoice:
    """Auxiliary-loss-free balancing (DeepSeek-V3): independent sigmoid scores;
    a per-expert bias shifts only which experts are chosen, the combine weights
    are the unbiased scores of the chosen experts normalised over the k."""
    _check_k(k, logits.shape[-1])
    if bias.shape != logits.shape[-1:]:
        raise ValueError(f"router bias shape {bias.shape} does not match {logits.shape[-1]} experts")
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    _, expert = jax.lax.top_k(scores + bias.astype(jnp.float32), k)
    weight = _normalize(jnp.take_along_axis(scores, expert, axis=-1))
    return TokenChoice(expert.astype(jnp.int32), weight, _normalize(scores))


def grouped_topk(logits, k: int, num_groups: int, *, renormalize: bool) -> TokenChoice:
    """Experts are split into num_groups contiguous groups and every token takes
    its k / num_groups best experts from each group, so each group (e.g. the
    experts of one device) receives exactly T * k / num_groups assignments."""
    T, E = logits.shape
    _check_k(k, E)
    if E % num_groups or k % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({E}) and top_k ({k})")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    per_group = E // num_groups
    weight, local = jax.lax.top_k(probs.reshape(T, num_groups, per_group), k // num_groups)
    expert = local + (jnp.arange(num_groups) * per_group)[:, None]
    weight = weight.reshape(T, k)
    return TokenChoice(expert.reshape(T, k).astype(jnp.int32),
                       _normalize(weight) if renormalize else weight, probs)


def expert_choice(logits, capacity: int) -> ExpertChoice:
    """Each expert takes the `capacity` tokens with the highest softmax
    probability for it; a token may get several experts or none."""
    T = logits.shape[0]
    if not 1 <= capacity <= T:
        raise ValueError(f"expert-choice capacity must be in [1, {T}] (the tokens), got {capacity}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weight, token = jax.lax.top_k(probs.T, capacity)
    return ExpertChoice(token.astype(jnp.int32), weight, probs)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: capacity_factor times the balanced share of T * k
    assignments, at least 1 and at most T (an expert sees a token at most once)."""
    share = capacity_factor * num_tokens * top_k / num_experts
    return max(1, min(num_tokens, math.ceil(share)))
