"""A KV-cache format seen through generation's decode path: each next
token's log-probability and argmax with the tokens fed (teacher forcing:
a prefill of the prompt, then one decode step a token, as generation runs
them), the same from the full-recompute forward, and greedy generation.

Every function takes a jaxkit.generate.Engine, whose model is the one
generation runs (layers unrolled, eval mode, weights in the compute dtype)
and whose kv_cache format the caches take."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.generate import Engine
from jaxkit.generate.cache import empty_caches


def scores(logits, targets):
    """(log-probability of each target [...], argmax [...]) of logits [..., V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jnp.argmax(logits, -1)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _teacher_forced(graphdef, state, fmt: str, capacity: int, prompt_len: int,
                    implementation: str, tokens):
    model = nnx.merge(graphdef, state)
    c = model.cfg
    B, S = tokens.shape
    caches = empty_caches(c.num_layers, (B, capacity), c.kv_heads, c.dim_per_head, fmt,
                          residual_dtype=c.compute_dtype)
    first, caches = model.prefill(tokens[:, :prompt_len], jnp.full((B,), prompt_len), caches)

    def step(caches, position):  # feeds the token at `position`
        fed = jax.lax.dynamic_slice_in_dim(tokens, position, 1, axis=1)
        logits, caches = model.decode(fed, jnp.full((B,), position + 1), caches,
                                      implementation=implementation)
        return caches, logits[:, 0]
    _, rest = jax.lax.scan(step, caches, jnp.arange(prompt_len, S - 1))
    logits = jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
    return scores(logits, tokens[:, prompt_len:])


def teacher_forced(engine: Engine, tokens: np.ndarray, prompt_len: int):
    """tokens [B, S] (S <= max_seq_len): prefills the first prompt_len of
    each row into empty caches of the engine's format, then feeds the rest
    one decode step a token. Returns (log-probability [B, S - prompt_len] of
    tokens prompt_len.., argmax there) as NumPy arrays."""
    out = _teacher_forced(engine.graphdef, engine.state, engine.fmt,
                          engine.capacity(tokens.shape[1]), prompt_len, engine.implementation,
                          jnp.asarray(tokens, jnp.int32))
    return tuple(np.asarray(x) for x in out)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _full_recompute(graphdef, state, prompt_len: int, tokens):
    logits = nnx.merge(graphdef, state)(tokens)[0]
    return scores(logits[:, prompt_len - 1:-1], tokens[:, prompt_len:])


def full_recompute(engine: Engine, tokens: np.ndarray, prompt_len: int):
    """As teacher_forced, from one causal forward over the whole rows."""
    out = _full_recompute(engine.graphdef, engine.state, prompt_len,
                          jnp.asarray(tokens, jnp.int32))
    return tuple(np.asarray(x) for x in out)


def greedy(engine: Engine, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """[B, new_tokens]: each prompt's (a row of prompts) greedy continuation,
    EOS ignored."""
    decoding = engine.start(list(prompts), max_new_tokens=new_tokens, temperature=0.0, top_k=0,
                            top_p=1.0, seed=0, eos_id=None, vocab_size=engine.cfg.vocab_size)
    outputs = [decoding.first] + [decoding.step() for _ in range(new_tokens - 1)]
    generated = np.stack([np.asarray(o.tokens) for o in outputs], axis=1)
    emitted = np.stack([np.asarray(o.emitted) for o in outputs], axis=1)
    decoding.close()
    if not emitted.all():
        raise ValueError(f"a sequence stopped before {new_tokens} tokens (model.max_seq_len "
                         f"{engine.cfg.max_seq_len})")
    return generated
