"""Pure train and eval steps over (params, opt_state, model_state) pytrees.

The model is split into its graph definition and state once; the step merges
them inside jit, so the same step serves every mesh and every model variant.
Non-parameter model state (e.g. an aux-loss-free MoE router bias) is carried
through the step and updated by the forward pass.

Non-finite steps are found on device: each step flags whether its loss and
gradient norm are finite, may skip its update when they are not, and
track_nonfinite carries the first such step and their count to the host's
next read of the metrics, so detection costs no per-step host sync.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxkit.train.loss import cross_entropy, linear_cross_entropy
from jaxkit.train.master_weights import apply_update


def model_on_batch(model, batch):
    """(logits, aux) of a batch: its inputs, and its per-document positions and
    segment ids when the data carries them (data.document_mask)."""
    return model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))


def model_loss(model, batch, z_loss, logits_dtype=jnp.float32):
    """(cross-entropy loss, metrics, aux) of a batch; the output projection is
    fused into the loss (no [tokens, vocab] logits, each chunk's stored in
    logits_dtype) unless the head is quantised."""
    targets, mask = batch["targets"], batch.get("loss_mask")
    w = model.output_projection()
    if w is None:
        logits, aux = model_on_batch(model, batch)
        return (*cross_entropy(logits, targets, mask, z_loss=z_loss), aux)
    x, aux = model.hidden(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    return (*linear_cross_entropy(x, w, targets, mask, z_loss=z_loss, logits_dtype=logits_dtype),
            aux)


def _forward(graphdef, params, model_state, batch, z_loss, logits_dtype):
    # copy: fresh Variables at this trace level, so the forward pass may update model state
    model = nnx.merge(graphdef, params, model_state, copy=True)
    loss, metrics, aux = model_loss(model, batch, z_loss, logits_dtype)
    metrics["moe_loss"] = aux["moe_loss"]
    return loss + aux["moe_loss"], metrics, aux["moe"], nnx.state(model, nnx.Not(nnx.Param))


class NonFiniteLoss(RuntimeError):
    """A training step's loss or gradient norm was NaN or inf (train.nonfinite: stop)."""


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule, *,
                    grad_accum: int, z_loss: float, constrain_batch=lambda b: b,
                    skip_nonfinite: bool = False, logits_dtype=jnp.float32):
    """Returns step(state, batch) -> (state, metrics). state is a dict with
    params, opt_state, model_state and step; the batch's leading axis is split
    into grad_accum micro-batches whose gradients are averaged. metrics["finite"]
    says whether the loss and gradient norm were finite; skip_nonfinite: when
    they were not, params, opt_state and model_state come back unchanged (only
    step advances)."""

    def loss_fn(params, model_state, batch):
        loss, metrics, moe, new_model_state = _forward(graphdef, params, model_state, batch, z_loss,
                                                       logits_dtype)
        return loss, (metrics, moe, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(state, batch):
        """(mean grads, model_state, loss, metrics, moe) over the micro-batches."""
        if grad_accum == 1:  # no float32 accumulators: one pass fewer over every parameter
            (loss, (metrics, moe, model_state)), grads = grad_fn(
                state["params"], state["model_state"], constrain_batch(batch))
            return grads, model_state, loss, metrics, moe
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def accumulate(carry, mb):
            grads, model_state = carry
            (loss, (metrics, moe, model_state)), g = grad_fn(state["params"], model_state,
                                                             constrain_batch(mb))
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
            return (grads, model_state), (loss, metrics, moe)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
        (grads, model_state), (losses, metrics, moe) = jax.lax.scan(
            accumulate, (zeros, state["model_state"]), micro)
        grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, state["params"])
        mean = lambda tree: jax.tree.map(lambda m: m.mean(0), tree)
        return grads, model_state, losses.mean(), mean(metrics), mean(moe)

    def step(state, batch):
        grads, model_state, loss, metrics, moe = gradients(state, batch)
        with jax.named_scope("optimizer"):  # so a profile can attribute the update's kernels
            params, opt_state = apply_update(optimizer, grads, state["opt_state"], state["params"])
        # in float32 whatever the gradients' dtype (bfloat16 with bfloat16 parameters)
        grad_norm = optax.tree.norm(optax.tree.cast(grads, jnp.float32))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       moe=moe, finite=finite)
        updated = dict(params=params, opt_state=opt_state, model_state=model_state)
        if skip_nonfinite:  # a select on device: exactly the old arrays when not finite
            updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                                   {k: state[k] for k in updated})
        return dict(updated, step=state["step"] + 1), metrics

    return step


def nonfinite_record() -> dict:
    """track_nonfinite's record before any step: first, the number of the
    first non-finite step (-1: none yet), and count, how many there were."""
    return dict(first=jnp.int32(-1), count=jnp.int32(0))


def track_nonfinite(train_step):
    """train_step(state, batch) -> (state, metrics), with metrics["finite"], becomes
    step(state, record, batch) -> (state, record, metrics): the record
    (nonfinite_record) carries on device the first non-finite step, numbered
    as the loop counts steps (state["step"] + 1), and their count, which
    metrics report as nonfinite_first and nonfinite_steps."""

    def step(state, record, batch):
        new_state, metrics = train_step(state, batch)
        bad = ~metrics.pop("finite")
        record = dict(first=jnp.where(bad & (record["first"] < 0), state["step"] + 1,
                                      record["first"]),
                      count=record["count"] + bad.astype(jnp.int32))
        metrics["nonfinite_steps"] = record["count"]
        metrics["nonfinite_first"] = record["first"]
        return new_state, record, metrics

    return step


def all_finite(tree) -> jax.Array:
    """Whether every element of every array in `tree` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def make_eval_step(graphdef, *, z_loss: float = 0.0):
    def step(params, model_state, batch):
        # float32 logits whatever train.logits_dtype: evaluations compare across runs
        loss, metrics, moe, _ = _forward(graphdef, params, model_state, batch, z_loss, jnp.float32)
        return dict(metrics, loss=loss, moe=moe)
    return step
