"""Flax NNX building blocks of jaxkit models."""
from jaxkit.layers.attention import Attention
from jaxkit.layers.linear import Linear
from jaxkit.layers.mlp import SwiGLU
from jaxkit.layers.norm import RMSNorm
from jaxkit.layers.rope import apply_rope

__all__ = ["Attention", "Linear", "RMSNorm", "SwiGLU", "apply_rope"]
