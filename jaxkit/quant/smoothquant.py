"""SmoothQuant: migrate activation outliers into the weights.

Per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the layer then
computes (x / s) @ (s W), the same product, with activations easier to
quantise and weights slightly harder.
"""
from __future__ import annotations

import jax.numpy as jnp


def smoothing_factors(act_channel_max, weight, alpha: float, eps: float = 1e-5):
    """s [in] from calibrated max|X_j| [in] and W [in, out]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    if act_channel_max.shape != weight.shape[:1]:
        raise ValueError(f"activation statistics {act_channel_max.shape} do not match the "
                         f"weight's input dimension {weight.shape[0]}")
    a = jnp.maximum(act_channel_max.astype(jnp.float32), eps)
    w = jnp.maximum(jnp.max(jnp.abs(weight.astype(jnp.float32)), axis=1), eps)
    return a ** alpha / w ** (1.0 - alpha)


def smooth(x, w, s):
    """(x / s, s W): x [..., in], W [in, out], s [in]."""
    return x / s.astype(x.dtype), w * s[:, None].astype(w.dtype)
