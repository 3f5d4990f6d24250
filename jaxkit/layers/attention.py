"""Grouped-query self-attention with rotary embeddings; the attention core is
pallas_kernels.flash_attention, so the implementation is a config choice.
A layer built with sparse=True attends block-sparsely instead
(model.attention.sparse: jaxkit.layers.sparse_attention), in training and
prefill. With a KV cache (generation) the decode steps attend through
pallas_kernels.decode_attention, densely: a decode step is one query."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxkit.config import AttentionConfig
from jaxkit.layers.linear import Linear
from jaxkit.layers.rope import apply_rope
from jaxkit.layers.sparse_attention import sparse_self_attention
from jaxkit.sharding import per_shard
from pallas_kernels.attention import flash_attention
from pallas_kernels.decode_attention import decode_attention

HEADS = ("batch", None, "act_heads", None)  # [batch, length, heads, head_dim]


class Attention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 cfg: AttentionConfig, rope_theta: float, rngs: nnx.Rngs, param_dtype,
                 compute_dtype, out_std: float | None = None, quant=None, sparse: bool = False):
        kw = dict(rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype, quant=quant)
        self.q = Linear(d_model, num_heads * head_dim, axes=("embed", "heads"), target="q", **kw)
        self.k = Linear(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), target="k",
                        **kw)
        self.v = Linear(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), target="v",
                        **kw)
        self.o = Linear(num_heads * head_dim, d_model, axes=("heads", "embed"), std=out_std,
                        target="o", **kw)
        self.qkv = nnx.data(None)  # q|k|v as one Linear, for generation (jaxkit.generate.fuse)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.cfg, self.rope_theta = cfg, rope_theta
        self.sparse = cfg.sparse if sparse else None

    def __call__(self, x, positions, segment_ids=None):
        q, k, v = self._project(x, positions)
        return self._output(self._flash(q, k, v, segment_ids))

    def cached(self, x, positions, cache, valid, lengths=None, implementation="auto"):
        """Attention that writes the K/V of x to a KV cache (an object with
        write(k, v, positions, valid) -> cache and k, v, page_table, such as
        jaxkit.generate.KVCache); returns (output, cache).

        Prefill (lengths None): x holds right-padded prompts from position 0
        and attends to itself as in training. Decode (lengths [B]: cache
        tokens per sequence, x's included): x holds each sequence's T newest
        tokens, at positions lengths - T + t, which attend to the cache with
        decode_attention(implementation). Only the valid [B, T] tokens are
        written."""
        q, k, v = self._project(x, positions)
        cache = cache.write(k, v, positions, valid)
        if lengths is None:
            out = self._flash(q, k, v, None)
        else:
            out = decode_attention(q, cache.k, cache.v, lengths, page_table=cache.page_table,
                                   sliding_window=self.cfg.sliding_window,
                                   logit_softcap=self.cfg.logit_softcap,
                                   implementation=implementation)
        return self._output(out), cache

    def _project(self, x, positions):
        """q [B, S, H, D] and k, v [B, S, KH, D], q and k rotated to positions."""
        B, S, _ = x.shape
        if self.qkv is None:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = jnp.split(self.qkv(x), [q_width, q_width + kv_width], axis=-1)
        q = q.reshape(B, S, self.num_heads, self.head_dim)
        k = k.reshape(B, S, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, S, self.num_kv_heads, self.head_dim)
        return (apply_rope(q, positions, theta=self.rope_theta),
                apply_rope(k, positions, theta=self.rope_theta), v)

    def _flash(self, q, k, v, segment_ids):
        # Per shard on a mesh: XLA cannot split a Pallas kernel itself.
        if self.sparse is not None:
            def core(q, k, v, seg):
                return sparse_self_attention(q, k, v, seg, self.sparse, self.cfg.implementation)
        else:
            def core(q, k, v, seg):
                return flash_attention(q, k, v, causal=True, segment_ids=seg,
                                       sliding_window=self.cfg.sliding_window,
                                       logit_softcap=self.cfg.logit_softcap,
                                       implementation=self.cfg.implementation)
        attend = per_shard(core, in_axes=(HEADS, HEADS, HEADS, ("batch", None)), out_axes=HEADS)
        return attend(q, k, v, segment_ids)

    def _output(self, out):
        B, S = out.shape[:2]
        return self.o(out.reshape(B, S, self.num_heads * self.head_dim))
