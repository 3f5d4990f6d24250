"""Learning-rate schedules and optimizers from config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxkit.config import OptimizerConfig
from jaxkit.train.master_weights import with_master_weights


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay, warmup-stable-decay, linear decay, or
    constant. The decays end at learning_rate * min_lr_ratio; linear with
    min_lr_ratio 0 is linear decay to zero (D2Z)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = max(int(round(rest * cfg.decay_fraction)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
            [rest - decay])
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, floor, rest)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([warm, after], [warmup])


def _decay_mask(params):
    # No weight decay on vectors (norm scales, biases).
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mu_dtype=cfg.mu_dtype, mask=_decay_mask)
    elif cfg.name == "lion":
        opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                         mu_dtype=cfg.mu_dtype, mask=_decay_mask)
    else:
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None,
                              weight_decay_mask=_decay_mask)
    if cfg.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return with_master_weights(opt) if cfg.master_weights else opt
