"""Mixture-of-experts layer: routers, dropless and capacity dispatch, expert
parallelism over the 'expert' mesh axis, routing metrics."""
from jaxkit.layers.moe.layer import MoE, RouterBias, moe_tokens

__all__ = ["MoE", "RouterBias", "moe_tokens"]
