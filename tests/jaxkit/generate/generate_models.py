"""Tiny models and a teacher-forced run through the KV cache, shared by the
generation tests."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.config import load_config
from jaxkit.generate import model_caches
from jaxkit.generate.cache import KVCache, empty_caches, storage
from jaxkit.generate.pages import PageAllocator, assign_pages
from jaxkit.models import Transformer

VOCAB = 61
# The reference attention everywhere (unless a test names a kernel), so that
# results agree to float32 rounding on any machine.
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
        "model.mlp_hidden=48", f"model.vocab_size={VOCAB}", "model.max_seq_len=40",
        "data.seq_len=40", "model.compute_dtype=float32", "model.attention.implementation=xla"]


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def tiny_model(*overrides, seed=0):
    cfg = tiny_config(*overrides)
    return Transformer(cfg.model, rngs=nnx.Rngs(seed))


def caches_for(cfg, batch, capacity, kv_cache="compute", page_size=None, seed=0):
    """Empty caches of `capacity` slots per sequence: contiguous, or pages of
    page_size handed out in a shuffled order (so a sequence's pages are not
    adjacent in the pool)."""
    fmt = storage(kv_cache, cfg.compute_dtype)
    if page_size is None:
        return empty_caches(cfg.num_layers, (batch, capacity), cfg.kv_heads, cfg.dim_per_head, fmt)
    per_seq = capacity // page_size
    allocator = PageAllocator(batch * per_seq + 3)
    np.random.default_rng(seed).shuffle(allocator._free)
    table = assign_pages(allocator, [capacity] * batch, capacity, page_size).table
    return empty_caches(cfg.num_layers, (allocator.num_pages, page_size), cfg.kv_heads,
                        cfg.dim_per_head, fmt, jnp.asarray(table))


def layer_caches(cfg, batch, capacity, kv_cache="compute", page_size=None):
    """model_caches (one per layer, of its kind: a recurrent state for linear
    attention) of `capacity` KV slots per sequence: contiguous, or over the
    shuffled page table of caches_for."""
    fmt = storage(kv_cache, cfg.compute_dtype)
    if page_size is None:
        return model_caches(cfg, batch, (batch, capacity), fmt)
    pool = caches_for(cfg, batch, capacity, kv_cache, page_size)[0]
    return model_caches(cfg, batch, jax.tree.leaves(pool.k)[0].shape[:2], fmt, pool.page_table)


def teacher_forced(model, sequences, prompt_lengths, cache_sets, steps, per_step=1,
                   implementation="xla"):
    """For each set of empty caches: the logits of prefilling each
    sequence's first prompt_lengths[b] tokens, then of `steps` decode steps
    of per_step tokens of the sequence each; and the full-recompute logits of
    the same positions. Returns (a list per cache set, the reference list)
    of [B, V] arrays, one per position after the prompts. implementation:
    decode_attention's."""
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, t, n, c: nnx.merge(graphdef, s).prefill(t, n, c))
    decode = jax.jit(lambda s, t, n, c: nnx.merge(graphdef, s).decode(
        t, n, c, implementation=implementation))
    seqs = jnp.asarray(sequences)
    starts = jnp.asarray(prompt_lengths, jnp.int32)
    results = []
    for caches in cache_sets:
        logits, caches = prefill(state, seqs[:, :int(max(prompt_lengths))], starts, caches)
        got, lengths = [logits], starts
        for _ in range(steps):
            positions = lengths[:, None] + jnp.arange(per_step)
            lengths = lengths + per_step
            step_logits, caches = decode(state, jnp.take_along_axis(seqs, positions, 1),
                                         lengths, caches)
            got.extend(step_logits[:, t] for t in range(per_step))
        results.append(got)
    reference = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, seqs)
    rows = jnp.arange(seqs.shape[0])
    return results, [reference[rows, starts - 1 + i] for i in range(steps * per_step + 1)]
