"""Projections that read the same input, run as one matmul for generation.

A decode step at small batch is bound by kernel launches, not weight bytes:
each projection is a GEMV whose fixed cost dominates, and a low-bit one is a
custom call XLA can neither merge with its neighbours nor keep inside a CUDA
graph. fuse_projections concatenates, along the output features, attention's
q, k, v into one Linear (Attention.qkv) and a SwiGLU's gate, up into one
(SwiGLU.gate_up; the MoE shared expert's included): three matmuls fewer a
layer, over the same weight bytes. A linear-attention mixer fuses its q, k,
v (LinearAttention.qkv) and its output gate and decay (gate_decay): five
projections become two.

Fused weights are the parts' weights side by side, never re-quantised: float
kernels [in, out] and the low-bit storage of Quantizer.convert (mode 'int')
concatenate along out, so each output column is computed from the same codes
and scales as before. A group stays unfused, without error, where that is not
possible: a part wrapped in a LoRA adapter or N:M sparse, fake-quantised
(modes 'qat', 'ptq'), parts that differ in kind, dtype or quant config, parts
whose input transform differs (Hadamard signs, SmoothQuant factors and static
activation scales are per layer), or fp8 128x128 weight blocks that a part's
width would split. Routed MoE experts are one grouped matmul already.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.layers import Attention, Linear, SwiGLU
from jaxkit.layers.linear_attention import LinearAttention
from pallas_kernels.quant_matmul import FP8_BLOCK

# Per module type: (parts, the attribute the fused Linear goes to).
GROUPS = {Attention: [(("q", "k", "v"), "qkv")],
          SwiGLU: [(("gate", "up"), "gate_up")],
          LinearAttention: [(("q", "k", "v"), "qkv"), (("gate", "decay"), "gate_decay")]}

# Per low-bit kernel (Quantizer.kernel_kind): the axis of each stored array
# along the output features. Other stored arrays (SmoothQuant's 'smooth')
# act on the input and must be equal in every part.
OUTPUT_AXIS = {"w8a8": {"codes": 0, "scale": 0},  # codes [N, K], scale [N]
               "fp8_blockwise": {"codes": 0, "scale": 0},  # [N, K], [ceil(N/128), K/128]
               "int4_weight_only": {"codes": 0, "scale": 1, "zero": 1}}  # [N, K/2], [K/g, N]


def fuse_projections(model: nnx.Module) -> int:
    """In place: every group of GROUPS that can be fused (module docstring)
    becomes one Linear, and its parts are dropped; returns how many groups
    were fused."""
    count = 0
    for _, module in list(nnx.iter_modules(model)):
        groups = [g for kind, gs in GROUPS.items() if isinstance(module, kind) for g in gs]
        for names, fused_name in groups:
            if getattr(module, fused_name) is not None:
                continue
            fused = fused_linear([getattr(module, name) for name in names])
            if fused is not None:
                setattr(module, fused_name, fused)
                for name in names:
                    setattr(module, name, nnx.data(None))
                count += 1
    return count


def fused_linear(parts: list) -> Linear | None:
    """One Linear computing the parts' outputs side by side, or None where
    they cannot be fused."""
    # type, not isinstance: a LoRA adapter or any other wrapper adds to the matmul
    if not all(type(p) is Linear and p.sparsity is None for p in parts):
        return None
    first = parts[0]
    if any(p.compute_dtype != first.compute_dtype for p in parts):
        return None
    quantizers = [p.quantizer for p in parts]
    if all(q is None for q in quantizers):
        kernels = [p.kernel for p in parts]
        if any(k is None or k.ndim != 2 or k.dtype != kernels[0].dtype for k in kernels):
            return None
        fused = nnx.clone(first)
        fused.kernel.set_value(jnp.concatenate([k[...] for k in kernels], axis=1))
        return fused
    if any(q is None or q.kernel_kind is None for q in quantizers) \
            or not _same_input_side(quantizers):
        return None
    axes = OUTPUT_AXIS[first.quantizer.kernel_kind]
    widths = [q.out_features for q in quantizers]
    if first.quantizer.kernel_kind == "fp8_blockwise" and any(w % FP8_BLOCK for w in widths[:-1]):
        return None  # a 128-row weight block would straddle two parts
    fused = nnx.clone(first)
    for key, var in fused.quantizer.storage.items():
        if key in axes:
            var.set_value(jnp.concatenate([q.storage[key][...] for q in quantizers],
                                          axis=axes[key]))
    fused.quantizer.out_features = sum(widths)
    return fused


def _same_input_side(quantizers) -> bool:
    """Whether the low-bit parts treat their (shared) input alike: the same
    config and kernel, rotation signs, static activation scale and every
    stored array that acts on the input."""
    first = quantizers[0]
    if any(q.cfg != first.cfg or q.kernel_kind != first.kernel_kind
           or q.in_features != first.in_features or q.phase != "run" for q in quantizers):
        return False
    axes = OUTPUT_AXIS[first.kernel_kind]
    if any(set(q.storage) != set(first.storage) for q in quantizers):
        return False
    inputs = [lambda q: q.signs, lambda q: q.act_stat]
    inputs += [lambda q, key=key: q.storage[key] for key in first.storage if key not in axes]
    return all(_equal(get(q), get(first)) for get in inputs for q in quantizers[1:])


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
