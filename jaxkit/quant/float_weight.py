"""The float weights that low-bit storage (mode 'int') stands for: what
merging into a quantised model and straight-through gradients need.

The stored codes hold the weight after SmoothQuant and rotation; both act on
the contraction axis as a linear map T of the activations (x -> T(x)), so the
float weight is T applied to the identity times the dequantised codes:
x @ W = T(x) @ W_stored exactly. Activation quantisation (w8a8, fp8) is not
part of W: x @ W equals the layer's forward up to it.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxkit.quant.experts import MATRICES, ExpertQuantizer
from jaxkit.quant.layer import Quantizer
from jaxkit.quant.rotation import rotate_activation
from pallas_kernels.quant_matmul import FP8_BLOCK, dequantize_int4


def _undo_transform(stored, transform_x):
    """W with x @ W == transform_x(x) @ stored, for stored [K, N]."""
    return transform_x(jnp.eye(stored.shape[0], dtype=jnp.float32)) @ stored


def linear_float_kernel(q: Quantizer):
    """float32 W [in, out] of a Linear converted to low-bit storage."""
    if q.kernel_kind is None:
        raise ValueError("the layer holds no low-bit storage (quantize_model converts it)")
    st = {k: v[...] for k, v in q.storage.items()}
    if q.kernel_kind == "w8a8":  # codes [N, K], a scale per output channel
        w = (st["codes"].astype(jnp.float32) * st["scale"][:, None]).T
    elif q.kernel_kind == "fp8_blockwise":  # codes [N, K], 128x128 block scales
        N, K = st["codes"].shape
        scale = jnp.repeat(jnp.repeat(st["scale"], FP8_BLOCK, axis=0)[:N], FP8_BLOCK, axis=1)
        w = (st["codes"].astype(jnp.float32) * scale[:, :K]).T
    else:
        w = dequantize_int4(st["codes"], st["scale"], st.get("zero"), group_size=q.cfg.block_size)
    if q.needs_channel_stats() or q.signs is not None:
        w = _undo_transform(w, q._transform_x)
    return w


def expert_float_weights(q: ExpertQuantizer) -> dict:
    """{'gate', 'up', 'down'}: float32 [E, in, out] of MoE experts converted
    to low-bit storage."""
    out = {}
    for name, stored in zip(MATRICES, q.stored_weights(), strict=True):
        w, signs = stored.dequantize(), q._signs(name)
        if signs is not None:
            w = jnp.stack([_undo_transform(e, lambda x: rotate_activation(x, signs)) for e in w])
        out[name] = w
    return out
