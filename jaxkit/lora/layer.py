"""A low-rank adapter on a frozen projection: y = base(x) + (alpha / r) * (x @ A) @ B.

A [in, r] and B [r, out] are LoRAParam (float32), the only nnx.Param of a
LoRA model, so the training step's split by nnx.Param hands the optimizer the
adapters alone and differentiates nothing else. The base Linear's weights are
Frozen model state; a base converted to low-bit storage (QLoRA) runs its
quant_matmul kernel forward and passes gradients to x through its dequantised
weight (straight through the activation quantisation of w8a8 and fp8), so
adapters before it learn as over a float base.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import LoRAConfig
from jaxkit.layers.linear import Linear
from jaxkit.quant.float_weight import linear_float_kernel


class LoRAParam(nnx.Param):
    """An adapter matrix: the parameters a LoRA model trains."""


class Frozen(nnx.Variable):
    """A weight of the base model under LoRA: model state that no optimizer
    sees and no gradient reaches."""


class LoRARng(nnx.Variable):
    """The raw PRNG key of an adapter's dropout, advanced by each training call."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _straight_through(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _straight_through_fwd(graphdef, state, x):
    return _straight_through(graphdef, state, x), (state, jnp.zeros((0,), x.dtype))


def _straight_through_bwd(graphdef, residuals, dy):
    state, like = residuals
    w = linear_float_kernel(nnx.merge(graphdef, state).quantizer)
    dx = jnp.dot(dy.astype(jnp.float32), w.T)
    return None, dx.astype(like.dtype)  # the stored codes and scales get no gradient


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def is_low_bit(linear: Linear) -> bool:
    """Whether the Linear's weight lives in low-bit storage (quantize_model)."""
    return linear.quantizer is not None and linear.quantizer.kernel_kind is not None


def features(linear: Linear) -> tuple[int, int]:
    if linear.kernel is not None:
        return linear.kernel.shape
    return linear.quantizer.in_features, linear.quantizer.out_features


class LoRALinear(nnx.Module):
    """A Linear (the frozen base) plus a rank-r adapter. A starts as
    cfg.init draws it (kaiming: uniform within 1/sqrt(in); gaussian: normal
    with std 1/r), B at zero, so the layer starts as its base."""

    def __init__(self, base: Linear, cfg: LoRAConfig, *, rngs: nnx.Rngs):
        d_in, d_out = features(base)
        axes = base.kernel.get_metadata().get("logical_axes", (None, None)) \
            if base.kernel is not None else (None, None)
        key = rngs.params()
        if cfg.init == "kaiming":
            a = jax.random.uniform(key, (d_in, cfg.rank), jnp.float32, -1.0, 1.0) * d_in ** -0.5
        else:
            a = jax.random.normal(key, (d_in, cfg.rank), jnp.float32) / cfg.rank
        self.base = base
        self.lora_a = LoRAParam(a, logical_axes=(axes[0], None))
        self.lora_b = LoRAParam(jnp.zeros((cfg.rank, d_out), jnp.float32),
                                logical_axes=(None, axes[1]))
        self.scale = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout
        self.rng = LoRARng(jax.random.key_data(rngs.dropout())) if cfg.dropout \
            else nnx.data(None)
        self.deterministic = True  # nnx's train/eval flag: dropout only in training

    def __call__(self, x):
        if is_low_bit(self.base):
            y = _straight_through(*nnx.split(self.base), x)
        else:
            y = self.base(x)
        cd = self.base.compute_dtype
        h = x.astype(cd)
        if self.rng is not None and not self.deterministic:
            h = self._dropout(h)
        a = jnp.dot(h, self.lora_a[...].astype(cd)) * jnp.asarray(self.scale, cd)
        return y + jnp.dot(a, self.lora_b[...].astype(cd)).astype(y.dtype)

    def _dropout(self, h):
        key, sub = jax.random.split(jax.random.wrap_key_data(self.rng[...]))
        self.rng[...] = jax.random.key_data(key)
        keep = jax.random.bernoulli(sub, 1.0 - self.dropout, h.shape)
        return jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)

    def delta(self):
        """(alpha / r) * A @ B, float32 [in, out]: what merging adds to the base weight."""
        return self.scale * jnp.dot(self.lora_a[...], self.lora_b[...],
                                    precision=jax.lax.Precision.HIGHEST)
