"""Decoder-only transformer: embeddings, pre-norm blocks of grouped-query
attention and a SwiGLU MLP (or a mixture of experts), tied or untied head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import ModelConfig
from jaxkit.layers import Attention, Linear, RMSNorm, SwiGLU
from jaxkit.layers.linear import param

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        pd, cd = DTYPES[cfg.param_dtype], DTYPES[cfg.compute_dtype]
        out_std = (2 * cfg.num_layers * cfg.d_model) ** -0.5  # keeps the residual stream's scale
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                              cfg=cfg.attention, rope_theta=cfg.rope_theta, rngs=rngs,
                              param_dtype=pd, compute_dtype=cd, out_std=out_std)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            from jaxkit.layers.moe import MoE  # imported only for MoE models
            self.mlp = MoE(cfg, rngs=rngs, out_std=out_std)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, rngs=rngs, param_dtype=pd,
                              compute_dtype=cd, out_std=out_std)

    def __call__(self, x, positions, segment_ids=None):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        h = self.mlp_norm(x)
        if self.is_moe:
            y, aux = self.mlp(h)
        else:
            y, aux = self.mlp(h), {}
        return x + y, aux


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           std=cfg.d_model ** -0.5, dtype=pd)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, param_dtype=pd,
            compute_dtype=DTYPES[cfg.compute_dtype])

    def __call__(self, tokens, positions=None, segment_ids=None):
        """tokens int [B, S] -> (logits float32 [B, S, vocab], aux dict).

        aux["moe_loss"] is the summed auxiliary loss of all MoE layers and
        aux["moe"] maps layer index to that layer's routing metrics.
        """
        cd = DTYPES[self.cfg.compute_dtype]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cd)
        moe_loss, moe_metrics = jnp.zeros((), jnp.float32), {}
        for i, block in enumerate(self.blocks):
            x, aux = block(x, positions, segment_ids)
            if aux:
                moe_loss = moe_loss + aux.pop("loss")
                moe_metrics[i] = aux
        x = self.final_norm(x)
        if self.head is None:
            logits = jnp.dot(x, self.embed[...].astype(cd).T, preferred_element_type=jnp.float32)
        else:
            logits = self.head(x).astype(jnp.float32)
        return logits, {"moe_loss": moe_loss, "moe": moe_metrics}


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
