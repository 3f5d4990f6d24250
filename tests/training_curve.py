"""The loss curve of a small model trained a number of steps on one fixed
batch of learnable repeats: what tests of a fused path compare against the
unfused one (the curves must agree within bf16 noise)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# A 2-layer, width-32 bf16 model on 24-token rows of a 67-token vocabulary.
TINY = ["model.vocab_size=67", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.mlp_hidden=64", "model.max_seq_len=24", "data.seq_len=24",
        "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=10"]


def tiny_config(*overrides: str):
    """The Config of TINY with more `key=value` overrides."""
    from jaxkit.config import load_config
    return load_config(None, TINY + list(overrides))


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
                                   grad_accum=1, z_loss=1e-4,
                                   logits_dtype=cfg.train.logits_dtype))
    state = dict(params=params, opt_state=opt.init(params), model_state=model_state,
                 step=jnp.zeros((), jnp.int32))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses)
