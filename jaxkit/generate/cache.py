"""Caches of a batch of sequences, one per layer, as pure pytrees so that
a decode step is one jitted function: a KVCache for a softmax attention
layer, a StateCache (the recurrent state) for a linear attention layer of
model.mixer 'linear' (model_caches picks each layer's kind).

A softmax layer's cache is contiguous, k and v [B, C, Hkv, D], or paged, a pool
[P, page_size, Hkv, D] shared by the batch with a page table [B,
pages_per_seq] naming each sequence's pages. Either stores the values in a
float dtype, as pallas_kernels.decode_attention.QuantizedKV (int8 or fp8
codes with a float32 scale per token and head) or in KIVI-2 (2-bit codes
quantized a group of tokens at a time; kivi.py). Position p of a sequence
lives in logical slot p % C (C the capacity), the ring rule decode_attention
reads by, so a sliding-window model keeps only its window.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxkit.generate import kivi
from pallas_kernels.decode_attention import (FORMATS, Kivi2Keys, QuantizedKV, kv_bytes_per_token,
                                             quantize_kv)
from pallas_kernels.decode_attention.kv_formats import CODES

FLOAT_KV = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
KIVI = "kivi2"
KV_CACHES = ("compute", *FLOAT_KV, *FORMATS, KIVI)  # generate.kv_cache values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's cache. k, v: arrays or QuantizedKV, [B, C, Hkv, D] when
    page_table is None, else page pools [P, page_size, Hkv, D] with
    page_table [B, pages_per_seq] int32."""
    k: Any
    v: Any
    page_table: jax.Array | None = None

    @property
    def capacity(self) -> int:
        """Slots per sequence, C."""
        slots = jax.tree.leaves(self.k)[0].shape[1]
        return slots if self.page_table is None else slots * self.page_table.shape[1]

    def write(self, k, v, positions, valid) -> KVCache:
        """The cache with k, v [B, T, Hkv, D] stored at their positions [B, T]
        where valid [B, T] (see rows; KIVI-2: see kivi.write)."""
        if isinstance(self.k, Kivi2Keys):
            return dataclasses.replace(self, **dict(zip("kv", kivi.write(
                self.k, self.v, k, v, positions, valid, self.page_table))))
        flat = self.rows(positions, valid)
        return dataclasses.replace(self, k=_store(self.k, k, flat), v=_store(self.v, v, flat))

    def rows(self, positions, valid):
        """Where write stores each position [B, T]: its row in the cache
        viewed as [rows, Hkv, D], or one past the last row (dropped) where not
        valid. Of a sequence's valid positions only the newest C are stored,
        so no row is written twice (a scatter's order is undefined on GPUs)."""
        newest = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
        keep = valid & (positions > newest - self.capacity)
        leaf = jax.tree.leaves(self.k)[0]
        rows = leaf.shape[0] * leaf.shape[1]
        slot = positions % self.capacity
        if self.page_table is None:
            flat = jnp.arange(positions.shape[0])[:, None] * self.capacity + slot
        else:
            page_size = leaf.shape[1]
            page = jnp.take_along_axis(self.page_table, slot // page_size, axis=1)
            flat = page * page_size + slot % page_size
        return jnp.where(keep, flat, rows)


def _store(buffer, x, flat):
    """buffer (array or QuantizedKV) with x [B, T, Hkv, D] scattered to rows flat [B, T]."""
    if isinstance(buffer, QuantizedKV):
        x = quantize_kv(x, buffer.fmt)

    def scatter(buf, new):
        rows = buf.reshape(-1, *buf.shape[2:])
        return rows.at[flat].set(new.astype(buf.dtype), mode="drop").reshape(buf.shape)
    return jax.tree.map(scatter, buffer, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StateCache:
    """One linear attention layer's cache: each sequence's recurrent state
    [B, H, Dk, Dv] float32 (LinearAttention.cached), a fixed size however
    long the sequence; the KV format and the page table do not apply."""
    state: jax.Array


def storage(kv_cache: str, compute_dtype) -> str:
    """The storage format of a generate.kv_cache choice: a float dtype name,
    a QuantizedKV format ('int8', 'fp8') or 'kivi2'."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if kv_cache in (*FORMATS, KIVI):
        return kv_cache
    dtype = compute_dtype if kv_cache == "compute" else FLOAT_KV[kv_cache]
    return jnp.dtype(dtype).name


def _zeros(fmt: str, leading: tuple[int, int], kv_heads: int, head_dim: int):
    shape = (*leading, kv_heads, head_dim)
    if fmt in FORMATS:
        return QuantizedKV(jnp.zeros(shape, CODES[fmt][0]), jnp.zeros(shape[:-1], jnp.float32))
    return jnp.zeros(shape, fmt)


def empty_caches(num_layers: int, leading: tuple[int, int], kv_heads: int, head_dim: int,
                 fmt: str, page_table=None, residual_dtype=jnp.bfloat16) -> list[KVCache]:
    """num_layers zeroed caches in format fmt (see storage): leading is
    (B, C) for contiguous caches, (P, page_size) for page pools, which take
    the page_table [B, pages_per_seq]. residual_dtype: KIVI-2's residual."""
    if fmt == KIVI:
        batch = leading[0] if page_table is None else page_table.shape[0]
        return [KVCache(*kivi.empty(leading, batch, kv_heads, head_dim, residual_dtype),
                        page_table) for _ in range(num_layers)]
    return [KVCache(_zeros(fmt, leading, kv_heads, head_dim),
                    _zeros(fmt, leading, kv_heads, head_dim), page_table)
            for _ in range(num_layers)]


def model_caches(cfg, batch: int, leading: tuple[int, int], fmt: str, page_table=None,
                 residual_dtype=jnp.bfloat16) -> list:
    """Zeroed caches of a batch of `batch` sequences, one per layer of a
    model (cfg: its ModelConfig): a StateCache for each linear attention
    layer, a KVCache as empty_caches makes it for each softmax layer."""
    kv = iter(empty_caches(cfg.num_layers - num_linear_layers(cfg), leading, cfg.kv_heads,
                           cfg.dim_per_head, fmt, page_table, residual_dtype))
    state = (batch, cfg.num_heads, cfg.dim_per_head, cfg.dim_per_head)
    return [StateCache(jnp.zeros(state, jnp.float32)) if cfg.is_linear_layer(i) else next(kv)
            for i in range(cfg.num_layers)]


def num_linear_layers(cfg) -> int:
    return sum(cfg.is_linear_layer(i) for i in range(cfg.num_layers))


def state_bytes_per_sequence(cfg) -> int:
    """Bytes of the recurrent states of one sequence over all linear layers."""
    return num_linear_layers(cfg) * cfg.num_heads * cfg.dim_per_head ** 2 * 4


def buffers(caches: list) -> list:
    """What a decode step updates in place (donates): each layer's cache,
    a KVCache without its page table, which is shared and stays."""
    return [dataclasses.replace(c, page_table=None) if isinstance(c, KVCache) else c
            for c in caches]


def join(buffers, page_table) -> list:
    """The caches of buffers(caches) with the page table put back."""
    return [dataclasses.replace(b, page_table=page_table) if isinstance(b, KVCache) else b
            for b in buffers]


def bytes_per_token(fmt: str, num_layers: int, kv_heads: int, head_dim: int) -> int:
    """Bytes one cached token takes over all layers, keys and values (a
    KIVI-2 cache's residual, a fixed amount a sequence, aside)."""
    per_layer = kivi.bytes_per_token(kv_heads, head_dim) if fmt == KIVI \
        else kv_bytes_per_token(fmt, kv_heads, head_dim)
    return math.ceil(num_layers * per_layer)
