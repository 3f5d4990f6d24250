"""Merging a LoRA model into plain weights, for export: each adapted
projection's kernel becomes W + (alpha / r) * A @ B, computed in float32."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxkit.layers.linear import Linear
from jaxkit.layers.moe import MoE
from jaxkit.lora.apply import replace_attributes, retype
from jaxkit.lora.layer import Frozen, LoRALinear, is_low_bit
from jaxkit.quant.float_weight import expert_float_weights, linear_float_kernel


def _float_kernel(linear: Linear):
    """The Linear's weight [in, out] in float32: its kernel, or the weight its
    low-bit storage stands for."""
    return linear_float_kernel(linear.quantizer) if is_low_bit(linear) \
        else linear.kernel[...].astype(jnp.float32)


def _set_kernel(linear: Linear, w, dtype, axes=None) -> Linear:
    """The Linear with the float kernel w and no quantizer."""
    linear.kernel = nnx.Param(w.astype(dtype), **({} if axes is None else {"logical_axes": axes}))
    linear.quantizer = nnx.data(None)
    return linear


def _merged(lora: LoRALinear, dtype) -> Linear:
    base = lora.base
    dtype = dtype if base.kernel is None else base.kernel.dtype
    axes = (lora.lora_a.get_metadata()["logical_axes"][0],
            lora.lora_b.get_metadata()["logical_axes"][1])
    return _set_kernel(base, _float_kernel(base) + lora.delta(), dtype, axes)


def merge_lora(model: nnx.Module, param_dtype=jnp.float32) -> nnx.Module:
    """Turns a LoRA model, in place, into the float model its forward stands
    for: adapters merged into their projections, low-bit Linear and MoE
    expert weights dequantised (param_dtype; a float base keeps its dtype),
    Frozen weights parameters again. Its nnx.Param are then laid out as in a
    model built from the same config with model.quant.mode 'none'. Activation
    quantisation (w8a8, fp8) is not part of any weight: the merged model
    computes in float where the quantised base rounded its inputs."""
    replace_attributes(model, lambda _, v: _merged(v, param_dtype)
                       if isinstance(v, LoRALinear) else None)
    for _, m in list(nnx.iter_modules(model)):
        if isinstance(m, Linear) and is_low_bit(m):
            _set_kernel(m, linear_float_kernel(m.quantizer), param_dtype)
        elif isinstance(m, MoE) and m.gate is None:  # experts in low-bit storage
            for name, w in expert_float_weights(m.quantizer).items():
                setattr(m, name, nnx.Param(w.astype(param_dtype)))
            m.quantizer = nnx.data(None)
    replace_attributes(model, lambda _, v: retype(v, nnx.Param) if isinstance(v, Frozen) else None)
    return model
