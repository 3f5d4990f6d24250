"""Choosing the next token from logits: greedy, or sampling at a
temperature from the top-k and nucleus (top-p) filtered distribution.
Pure functions of jax arrays; the settings are arrays too, so changing them
does not recompile a decode step.

Order (as in Hugging Face transformers): logits / temperature, then top-k,
then top-p of what top-k kept, then a draw.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy(logits):
    """argmax over the last axis, int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def limit_vocab(logits, size: int):
    """-inf beyond the first `size` ids (a model vocabulary padded past the
    tokenizer's)."""
    if size >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < size, logits, -jnp.inf)


def _descending(logits):
    return -jnp.sort(-logits, axis=-1)


def top_k_filter(logits, k):
    """logits [..., V] with all but the k largest per row set to -inf (ties
    at the k-th value kept); k an int array broadcasting to the rows, <= 0
    keeps everything."""
    ranked = _descending(logits)
    index = jnp.clip(jnp.asarray(k) - 1, 0, logits.shape[-1] - 1)
    kth = jnp.take_along_axis(ranked, jnp.broadcast_to(index, logits.shape[:-1])[..., None], -1)
    return jnp.where((jnp.asarray(k)[..., None] <= 0) | (logits >= kth), logits, -jnp.inf)


def top_p_filter(logits, p):
    """logits [..., V] keeping per row the smallest set of the most likely
    tokens whose probability reaches p (the most likely one always); p a
    float array broadcasting to the rows, in (0, 1]."""
    ranked = _descending(logits)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    keep = before < jnp.asarray(p)[..., None]
    kept = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits, keys, *, temperature, top_k, top_p, filtered: bool = True):
    """Tokens [B] int32 drawn from logits [B, V], one key per row (keys
    [B]); temperature > 0, top_k (<= 0: off) and top_p (1: off) are arrays
    broadcasting to [B]. filtered=False skips the filters (and their sort)."""
    scaled = logits / jnp.asarray(temperature, logits.dtype)[..., None]
    if filtered:
        scaled = top_p_filter(top_k_filter(scaled, top_k), top_p)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def sequence_keys(seed, batch: int):
    """One PRNG key per sequence, so that a sequence's draws depend on the
    seed and its index alone."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))


def step_keys(keys, counts):
    """The keys of each sequence's draw number counts[b]."""
    return jax.vmap(jax.random.fold_in)(keys, counts)
