"""Decoder-only transformer: embeddings, pre-norm blocks of grouped-query
attention (or gated linear attention: model.mixer) and a SwiGLU MLP (or a mixture of experts), tied or untied head.

model.remat recomputes each layer's activations in the backward pass
(everything, or all but the weight matmuls' outputs); model.scan_layers
stores the layers stacked along a "layers" axis and runs them with one
scanned body, so compile time does not grow with depth.

prefill and decode run unrolled layers with a cache per layer (keys and
values, or a linear attention layer's recurrent state), for generation
(jaxkit.generate)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import ConfigError, ModelConfig
from jaxkit.layers import Attention, Linear, RMSNorm, SwiGLU
from jaxkit.layers.linear import param
from jaxkit.layers.linear_attention import LinearAttention
from jaxkit.quant.config_check import check_head_target
from jaxkit.sharding import RESIDUAL, constrain
from jaxkit.sparsity import sparsify_linears

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# model.remat -> what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {"full": None,  # nothing: recompute the whole layer
                  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        pd, cd = DTYPES[cfg.param_dtype], DTYPES[cfg.compute_dtype]
        out_std = (2 * cfg.num_layers * cfg.d_model) ** -0.5  # keeps the residual stream's scale
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd,
                                 implementation=cfg.norm_implementation)
        if cfg.is_linear_layer(layer):
            self.attn = LinearAttention(cfg.d_model, cfg.num_heads, cfg.dim_per_head,
                                        cfg=cfg.linear_attention, rngs=rngs, param_dtype=pd,
                                        compute_dtype=cd, norm_eps=cfg.norm_eps, out_std=out_std,
                                        quant=cfg.quant)
        else:
            self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                                  cfg=cfg.attention, rope_theta=cfg.rope_theta, rngs=rngs,
                                  param_dtype=pd, compute_dtype=cd, out_std=out_std,
                                  quant=cfg.quant, sparse=cfg.is_sparse_attention_layer(layer))
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd,
                                implementation=cfg.norm_implementation)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            from jaxkit.layers.moe import MoE  # imported only for MoE models
            self.mlp = MoE(cfg, rngs=rngs, out_std=out_std)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, rngs=rngs, param_dtype=pd,
                              compute_dtype=cd, out_std=out_std, quant=cfg.quant)

    def __call__(self, x, positions, segment_ids=None):
        return self._feed_forward(x, self.attn(self.attn_norm(x), positions, segment_ids))

    def cached(self, x, positions, cache, valid, lengths=None, implementation="auto"):
        """The block with its mixer reading and writing its cache
        (Attention.cached, LinearAttention.cached); returns (x, cache)."""
        y, cache = self.attn.cached(self.attn_norm(x), positions, cache, valid, lengths,
                                    implementation)
        return self._feed_forward(x, y)[0], cache

    def _feed_forward(self, x, y):
        """The mixer's output y added to the residual x, then the MLP's
        residual; the add and mlp_norm run as one op (RMSNorm.add)."""
        x, h = self.mlp_norm.add(x, y)
        if self.is_moe:
            y, aux = self.mlp(h)
        else:
            y, aux = self.mlp(h), {}
        return x + y, aux


class Period(nnx.Module):
    """Consecutive blocks making up one repeat of the layer pattern (one block
    when all layers are alike): the unit that scan_layers stacks."""

    def __init__(self, blocks: list[Block]):
        self.layers = nnx.List(blocks)

    def __call__(self, x, positions, segment_ids=None):
        auxes = []
        for block in self.layers:
            x, aux = block(x, positions, segment_ids)
            x = constrain(x, RESIDUAL)
            auxes.append(aux)
        return x, auxes


def layer_period(blocks: list[Block]) -> int:
    """Smallest p dividing the layer count with layer i built like layer i % p."""
    defs = [nnx.graphdef(b) for b in blocks]
    n = len(defs)
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(defs[i] == defs[i % p] for i in range(n)))


def scan_layout(blocks: list[Block]) -> tuple[int, int] | None:
    """(prefix, period): the fewest leading layers to keep unrolled so that the
    rest repeat with a period at least twice (a dense first layer before MoE
    layers, say), or None when no such layout exists. One layer is one period."""
    if len(blocks) == 1:
        return 0, 1
    for prefix in range(len(blocks) - 1):
        p = layer_period(blocks[prefix:])
        if (len(blocks) - prefix) // p >= 2:
            return prefix, p
    return None


def stack_modules(modules: list[nnx.Module], axis: str = "layers") -> nnx.Module:
    """One module whose variables hold the (structurally identical) modules'
    values stacked along a new leading dimension, named `axis` in logical_axes."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules])
    module = nnx.merge(nnx.graphdef(modules[0]), stacked)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            var.set_metadata(logical_axes=(axis, *var.get_metadata()["logical_axes"]))
    return module


def _apply(unit, x, positions, segment_ids):
    return unit(x, positions, segment_ids)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        check_head_target(cfg.quant, cfg.tie_embeddings)
        pd = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           std=cfg.d_model ** -0.5, dtype=pd)
        blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)]
        if cfg.scan_layers:
            layout = scan_layout(blocks)
            if layout is None:
                raise ConfigError(
                    "model.scan_layers needs the layers after some unrolled prefix to repeat a "
                    f"pattern at least twice; the layer layout (moe.first_layer={cfg.moe.first_layer},"
                    f" moe.every={cfg.moe.every}, softmax_every={cfg.softmax_every}, "
                    f"num_layers={cfg.num_layers}) has none: set "
                    "model.scan_layers=false")
            prefix, p = layout
            self.prefix = nnx.List(blocks[:prefix])  # unrolled, before the scanned repeats
            self.blocks = stack_modules([Period(blocks[i:i + p])
                                         for i in range(prefix, cfg.num_layers, p)])
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd,
                                  implementation=cfg.norm_implementation)
        self.head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, param_dtype=pd,
            compute_dtype=DTYPES[cfg.compute_dtype], quant=cfg.quant, target="head")
        sparsify_linears(self, cfg.sparsity)

    def __call__(self, tokens, positions=None, segment_ids=None):
        """tokens int [B, S] -> (logits float32 [B, S, vocab], aux dict).

        aux["moe_loss"] is the summed auxiliary loss of all MoE layers and
        aux["moe"] maps layer index to that layer's routing metrics.
        """
        x, aux = self.hidden(tokens, positions, segment_ids)
        return self.logits(x), aux

    def logits(self, x):
        """Final normed hidden states [..., d_model] -> logits float32 [..., vocab]."""
        w = self.output_projection()
        if w is None:
            return self.head(x).astype(jnp.float32)
        return jnp.dot(x, w, preferred_element_type=jnp.float32)

    def hidden(self, tokens, positions=None, segment_ids=None):
        """tokens int [B, S] -> (final normed hidden states [B, S, d_model] in
        the compute dtype, aux dict as __call__'s): what the output projection
        takes, for losses that fuse it."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, layer_aux = self._layers(self._embed(tokens), positions, segment_ids)
        moe_loss, moe_metrics = jnp.zeros((), jnp.float32), {}
        for i, aux in enumerate(layer_aux):
            if aux:
                moe_loss = moe_loss + aux.pop("loss")
                moe_metrics[i] = aux
        return self.final_norm(x), {"moe_loss": moe_loss, "moe": moe_metrics}

    def prefill(self, tokens, lengths, caches):
        """The prompts tokens int [B, S] (sequence b's first lengths[b]
        tokens; the rest padding) through the model, their keys and values
        written to caches (one per layer: a jaxkit.generate.KVCache, or a
        StateCache for a linear attention layer, whose state ends at each
        prompt's last token; jaxkit.generate.model_caches) -> (logits
        float32 [B, vocab] of each prompt's last token, caches)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, caches = self._cached_layers(self._embed(tokens), positions, caches,
                                        positions < lengths[:, None], None, "auto")
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(self.final_norm(last)), caches

    def decode(self, tokens, lengths, caches, active=None, implementation: str = "auto"):
        """A decode step: tokens int [B, T], each sequence's T newest, at
        positions lengths - T + t (lengths [B] counts the cached tokens,
        these included) -> (logits float32 [B, T, vocab], caches). Sequences
        where active [B] is False change nothing their cache reads back
        (their logits are meaningless). implementation: decode_attention's."""
        T = tokens.shape[1]
        positions = lengths[:, None] - T + jnp.arange(T)
        valid = jnp.ones(tokens.shape, bool) if active is None \
            else jnp.broadcast_to(active[:, None], tokens.shape)
        x, caches = self._cached_layers(self._embed(tokens), positions, caches, valid, lengths,
                                        implementation)
        return self.logits(self.final_norm(x)), caches

    def _cached_layers(self, x, positions, caches, valid, lengths, implementation):
        if self.cfg.scan_layers:
            raise ValueError("generation runs the layers one by one: unroll a model with "
                             "model.scan_layers=true first (jaxkit.models.unscan_layers)")
        if len(caches) != len(self.blocks):
            raise ValueError(f"{len(caches)} caches for {len(self.blocks)} layers")
        updated = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.cached(x, positions, cache, valid, lengths, implementation)
            updated.append(cache)
        return x, updated

    def _embed(self, tokens):
        """tokens int [B, S] -> embeddings [B, S, d_model] in the compute dtype."""
        # Gathered whole along embed (the FSDP all-gather, as for any layer's weights);
        # vocab stays split over tensor for the lookup and the tied head.
        # Looked up in float32 so that the gradient's scatter-add over repeated
        # tokens sums in float32 when the table is stored in bfloat16.
        table = constrain(self.embed[...], ("vocab", None)).astype(jnp.float32)
        return constrain(jnp.take(table, tokens, axis=0).astype(DTYPES[self.cfg.compute_dtype]),
                         RESIDUAL)

    def output_projection(self):
        """The output head as a [d_model, vocab] matrix in the compute dtype, or
        None when the head is quantised (then only __call__ applies it)."""
        cd = DTYPES[self.cfg.compute_dtype]
        if self.head is None:
            return constrain(self.embed[...], ("vocab", None)).astype(cd).T
        if self.head.quantizer is not None:
            return None
        return self.head.weight().astype(cd)

    def _layers(self, x, positions, segment_ids):
        """Runs every block; returns x and the per-layer aux dicts in layer order."""
        apply = _apply
        if self.cfg.remat != "none":
            apply = nnx.remat(_apply, policy=REMAT_POLICIES[self.cfg.remat],
                              prevent_cse=not self.cfg.scan_layers)
        auxes = []
        for block in self.blocks if not self.cfg.scan_layers else self.prefix:
            x, aux = apply(block, x, positions, segment_ids)
            x = constrain(x, RESIDUAL)
            auxes.append(aux)
        if not self.cfg.scan_layers:
            return x, auxes

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0))
        def scan(x, period, positions, segment_ids):
            return apply(period, x, positions, segment_ids)

        x, stacked = scan(x, self.blocks, positions, segment_ids)
        repeats = (self.cfg.num_layers - len(auxes)) // len(stacked)
        return x, auxes + [jax.tree.map(lambda a: a[j], aux)
                           for j in range(repeats) for aux in stacked]


def unscan_layers(model: Transformer) -> Transformer:
    """The same model (same values, every variable copied) with its layer stack
    unrolled, as if built with scan_layers=false: per-layer modules, which
    post-training quantisation calibrates and converts one by one."""
    cfg = model.cfg
    if not cfg.scan_layers:
        return model
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    out = nnx.eval_shape(lambda: Transformer(flat_cfg, rngs=nnx.Rngs(0)))
    prefix, period = len(model.prefix), len(model.blocks.layers)
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[:2] == ("blocks", "layers"):
            j, rest = path[2], path[3:]
            for i in range((cfg.num_layers - prefix) // period):
                values[("blocks", prefix + i * period + j, *rest)] = var[...][i]
        elif path[0] == "prefix":
            values[("blocks", *path[1:])] = var[...]
        else:
            values[path] = var[...]
    for path, var in nnx.to_flat_state(nnx.state(out)):
        if path not in values:
            raise ValueError(f"unscan_layers: no value for {path} in the scanned model")
        var.set_value(jnp.array(values.pop(path)))
    if values:
        raise ValueError(f"unscan_layers: scanned variables with no unrolled place: {sorted(values)}")
    return out


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
