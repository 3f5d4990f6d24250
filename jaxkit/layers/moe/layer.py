"""The mixture-of-experts feed-forward layer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import ModelConfig, MoEConfig
from jaxkit.layers.linear import param
from jaxkit.layers.mlp import SwiGLU
from jaxkit.layers.moe import dispatch, routers
from jaxkit.layers.moe.expert_parallel import sharded_moe
from jaxkit.layers.moe.experts import ExpertWeights, LocalExperts
from jaxkit.layers.moe.metrics import balance_bias_update, routing_stats, summarize
from jaxkit.layers.moe.permute import bincount
from jaxkit.quant.experts import ExpertQuantizer
from jaxkit.sharding import active


class RouterBias(nnx.Variable):
    """Per-expert selection bias of aux-loss-free balancing: model state
    updated by the forward pass, not a parameter the optimizer sees."""


class RouterCenter(nnx.Variable):
    """Running mean of the router input (and the number of updates), used in
    place of the batch mean outside training: model state, not a parameter."""


# Weight of the previous running mean in each training-step update; the mean
# is bias-corrected by the number of updates (as Adam's moments are), so it
# is the batch mean itself after the first step.
CENTER_MOMENTUM = 0.99


def moe_tokens(x, router_kernel, bias, experts, cfg: MoEConfig, logit_shift=None):
    """Routes, dispatches and combines the tokens x [T, D] at hand.
    logit_shift [E] (or None) is subtracted from every token's router logits.
    Returns (y [T, D] float32, RoutingStats of these tokens)."""
    T, E, k = x.shape[0], cfg.num_experts, cfg.top_k
    logits = jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32))
    if logit_shift is not None:
        logits = logits - logit_shift
    if cfg.router == "expert_choice":
        route = routers.expert_choice(logits, routers.expert_capacity(T, E, k, cfg.capacity_factor))
        y, unchosen = dispatch.chosen_by_experts(x, route, experts)
        counts = jnp.full((E,), route.token.shape[1])
        return y, routing_stats(logits, route.probs, counts, unchosen, T)
    if cfg.router == "topk_softmax":
        route = routers.topk_softmax(logits, k, renormalize=cfg.renormalize)
    elif cfg.router == "sigmoid_bias":
        route = routers.sigmoid_bias(logits, bias, k)
    elif cfg.router == "grouped":
        route = routers.grouped_topk(logits, k, cfg.num_groups, renormalize=cfg.renormalize)
    else:
        raise ValueError(f"unknown MoE router {cfg.router!r}")
    counts = bincount(route.expert, E)
    if cfg.dispatch == "dropless":
        y, kept = dispatch.dropless(x, route, experts, cfg.permute_implementation), T * k
    elif cfg.dispatch == "capacity":
        slots = routers.expert_capacity(T, E, k, cfg.capacity_factor)
        y, kept = dispatch.capacity(x, route, E, slots, experts, cfg.permute_implementation)
    else:
        raise ValueError(f"unknown MoE dispatch {cfg.dispatch!r}")
    return y, routing_stats(logits, route.probs, counts, T * k - kept, T * k)


class MoE(nnx.Module):
    """Routed SwiGLU experts (plus optional always-on shared experts).

    __call__(x [B, S, D]) -> (y [B, S, D], aux) with aux["loss"] the weighted
    load-balancing + router z-loss and the metrics of metrics.summarize.

    With router sigmoid_bias the balancing bias is updated in training mode
    only: `model.train()` (nnx set_attributes, which sets deterministic=False)
    turns the update on, `model.eval()` turns it off; the training loop builds
    its train step from the model in train mode. A fresh module is in eval mode.

    Inside jaxkit.sharding.activate(mesh, rules) the layer runs expert
    parallel (expert_parallel.py), on the mesh axes the rules give.

    With quant target 'experts' an ExpertQuantizer quantises the routed
    experts (and the shared experts' Linear layers get the same target).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_std: float | None = None):
        m = cfg.moe
        if m.num_experts < 1:
            raise ValueError(f"MoE layer needs moe.num_experts >= 1, got {m.num_experts}")
        pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        D, E, H = cfg.d_model, m.num_experts, m.expert_hidden
        self.cfg, self.compute_dtype = m, cd
        self.router = param(rngs, (D, E), ("embed", None), std=D ** -0.5, dtype=pd)
        self.gate = param(rngs, (E, D, H), ("exp", "embed", "mlp"), std=D ** -0.5, dtype=pd)
        self.up = param(rngs, (E, D, H), ("exp", "embed", "mlp"), std=D ** -0.5, dtype=pd)
        self.down = param(rngs, (E, H, D), ("exp", "mlp", "embed"),
                          std=H ** -0.5 if out_std is None else out_std, dtype=pd)
        self.bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,)) \
            if m.router == "sigmoid_bias" else None
        self.center = RouterCenter(jnp.zeros((D + 1,), jnp.float32), logical_axes=(None,)) \
            if m.center_router_input else None
        self.shared = SwiGLU(D, m.num_shared_experts * H, rngs=rngs, param_dtype=pd,
                             compute_dtype=cd, out_std=out_std, quant=cfg.quant,
                             target="experts") if m.num_shared_experts else None
        q = cfg.quant
        self.quantizer = ExpertQuantizer(D, H, q, rngs=rngs) \
            if q.mode != "none" and "experts" in q.targets else nnx.data(None)
        self.deterministic = True  # nnx's train/eval flag; False enables the bias update

    def __call__(self, x):
        B, S, D = x.shape
        m = self.cfg
        xc = x.astype(self.compute_dtype)
        if self.gate is None:  # converted to low-bit storage by jaxkit.quant.quantize_model
            weights = ExpertWeights(*self.quantizer.stored_weights())
        else:
            weights = ExpertWeights(self.gate[...], self.up[...], self.down[...])
        quant = None if self.quantizer is None else self.quantizer.quant()
        bias = None if self.bias is None else self.bias[...]
        shift = None if self.center is None else self._router_center(xc) @ self.router[...]
        body = lambda t, r, b, s, experts: moe_tokens(t, r, b, experts, m, s)
        placement = active()  # (mesh, rules) inside jaxkit.sharding.activate
        if placement is None or placement[0].size == 1:
            y, stats = body(xc.reshape(B * S, D), self.router[...], bias, shift,
                            LocalExperts(weights, m.gmm_implementation, quant, m.gmm_consumers,
                                         m.gmm_pingpong))
            y = y.reshape(B, S, D)
        else:
            mesh, rules = placement
            y, stats = sharded_moe(body, xc, self.router[...], bias, shift, weights, mesh=mesh,
                                   rules=rules, implementation=m.gmm_implementation, quant=quant,
                                   consumers=m.gmm_consumers, pingpong=m.gmm_pingpong)
        loss, metrics = summarize(stats, aux_loss_weight=m.aux_loss_weight,
                                  z_loss_weight=m.router_z_loss_weight)
        if self.bias is not None and not self.deterministic:
            self.bias[...] = balance_bias_update(self.bias[...], metrics["load"], m.bias_update_rate)
        y = y.astype(self.compute_dtype)
        if self.shared is not None:
            y = y + self.shared(xc)
        return y, {"loss": loss, **metrics}

    def _router_center(self, x):
        """The mean router input to remove [D] (float32, no gradient): the
        batch mean in training, whose running mean this updates; the running
        mean otherwise. At initialisation most of every token's MoE input is
        one shared vector, so uncentred routers send almost all tokens to the
        same k experts (docs/design/moe-dispatch.md)."""
        state = self.center[...]
        if self.deterministic:
            mean, n = state[:-1], state[-1]
            return mean / jnp.maximum(1.0 - CENTER_MOMENTUM ** n, 1e-12)
        batch_mean = jax.lax.stop_gradient(jnp.mean(x.astype(jnp.float32), axis=(0, 1)))
        self.center[...] = jnp.concatenate([CENTER_MOMENTUM * state[:-1]
                                            + (1.0 - CENTER_MOMENTUM) * batch_mean,
                                            state[-1:] + 1.0])
        return batch_mean
