"""KV-cache memory of a model: the bytes a token takes in one layer, and the
peak of weights plus caches for a batch of sequences of a given context,
from the caches generation allocates (jax.eval_shape of
jaxkit.generate.cache.empty_caches, so nothing is allocated and a 7B shape
costs nothing)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import ModelConfig
from jaxkit.generate.cache import bytes_per_token, empty_caches, storage
from jaxkit.models import Transformer

# Llama-2-7B's shape, the model of KIVI's memory figure (multi-head attention, 32 heads of 128).
LLAMA2_7B = ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                        mlp_hidden=11008, max_seq_len=4096, tie_embeddings=False,
                        compute_dtype="bfloat16")


@functools.cache  # tracing a model's initialisation takes seconds
def parameter_count(model: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def bytes_per_token_per_layer(model: ModelConfig, kv_cache: str) -> int:
    """One token's keys and values in one layer (KIVI-2's residual aside)."""
    return bytes_per_token(storage(kv_cache, model.compute_dtype), 1, model.kv_heads,
                           model.dim_per_head)


def cache_bytes(model: ModelConfig, kv_cache: str, batch: int, context: int) -> int:
    """The contiguous caches of `batch` sequences of `context` slots (a
    multiple of KIVI-2's group of 32), KIVI-2's residuals included."""
    fmt = storage(kv_cache, model.compute_dtype)
    caches = jax.eval_shape(lambda: empty_caches(
        model.num_layers, (batch, context), model.kv_heads, model.dim_per_head, fmt,
        residual_dtype=model.compute_dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))


def peak(model: ModelConfig, kv_caches, batch: int, context: int) -> dict:
    """Per format: the caches' bytes, the peak (the weights in the compute
    dtype, as generation stores them, plus the caches; activations aside)
    and how many times smaller that peak is than the first format's."""
    weights = parameter_count(model) * jnp.dtype(model.compute_dtype).itemsize
    rows = {}
    for kv_cache in kv_caches:
        cache = cache_bytes(model, kv_cache, batch, context)
        rows[kv_cache] = {"cache_bytes": cache, "peak_bytes": weights + cache}
    base = rows[kv_caches[0]]["peak_bytes"]
    for row in rows.values():
        row["peak_reduction"] = base / row["peak_bytes"]
    return {"batch": batch, "context": context, "weight_bytes": weights, "formats": rows}
