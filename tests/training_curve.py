"""The loss curve of a small model trained a number of steps on one fixed
batch of learnable repeats: what tests of a fused path compare against the
unfused one (the curves must agree within bf16 noise)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def repeats_batch(vocab_size: int, seq_len: int, rows: int = 8, period: int = 6, seed: int = 1):
    """inputs/targets of rows that repeat a random `period`-token pattern."""
    rng = np.random.default_rng(seed)
    reps = -(-(seq_len + 1) // period)
    seqs = np.stack([np.tile(rng.integers(0, vocab_size, period), reps) for _ in range(rows)])
    return dict(inputs=jnp.asarray(seqs[:, :seq_len]), targets=jnp.asarray(seqs[:, 1:seq_len + 1]))


def loss_curve(cfg, batch, steps: int = 100) -> np.ndarray:
    """Losses of `steps` AdamW steps of a Config's model on `batch`."""
    from jaxkit.models import Transformer
    from jaxkit.run.build import split_model
    from jaxkit.train.optim import make_optimizer, make_schedule
    from jaxkit.train.step import make_train_step

    graphdef, _, params, model_state = split_model(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    opt = make_optimizer(cfg.optimizer, steps)
    step = jax.jit(make_train_step(graphdef, opt, make_schedule(cfg.optimizer, steps),
                                   grad_accum=1, z_loss=1e-4))
    state = dict(params=params, opt_state=opt.init(params), model_state=model_state,
                 step=jnp.zeros((), jnp.int32))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses)
