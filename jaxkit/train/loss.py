"""Next-token cross-entropy with an optional z-loss and a loss mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, mask=None, *, z_loss: float = 0.0):
    """Mean over unmasked tokens. Returns (loss, metrics) with metrics holding
    the plain cross-entropy, the z-loss term, the token count and accuracy."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    ce = (nll * mask).sum() / count
    zl = z_loss * ((lse ** 2) * mask).sum() / count
    correct = ((jnp.argmax(logits, -1) == targets) * mask).sum() / count
    return ce + zl, {"ce": ce, "z_loss": zl, "tokens": mask.sum(), "accuracy": correct}
