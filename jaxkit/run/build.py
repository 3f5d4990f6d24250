"""The one place that maps a Config to objects: mesh, model, optimizer,
train state, data sources and their global batches.

Every command starts with build_mesh, which first runs the config checks
that need the packages the config configures (check_config), so a bad value
is reported before anything is placed on a device or compiled."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit import sharding
from jaxkit.config import Config, ConfigError
from jaxkit.models import Transformer
from jaxkit.quant.config_check import check_head_target, check_quant_config
from jaxkit.train.optim import make_optimizer, make_schedule
from pallas_kernels import compat


def check_config(cfg: Config) -> None:
    """The checks jaxkit.config leaves to the packages that know the values:
    mesh.rules entries name mesh axes, model.quant has formats, groupings and
    (mode 'int') a kernel. Raises ConfigError naming the bad value."""
    sharding.resolve_rules(cfg.mesh.rules)
    q = cfg.model.quant
    try:
        check_quant_config(q)
        check_head_target(q, cfg.model.tie_embeddings)
    except ValueError as err:
        raise ConfigError(f"model.quant: {err}") from None


def check_devices(cfg: Config) -> None:
    """What this machine's devices cannot run, refused before anything is
    built (check_config's checks hold on any machine: a sweep plans on one
    without GPUs)."""
    e = cfg.model.moe
    if e.num_experts and e.gmm_consumers != 1 and not compat.is_hopper():
        raise ConfigError(f"model.moe.gmm_consumers={e.gmm_consumers} runs the Mosaic GPU grouped "
                          "matmuls, which need a Hopper GPU; this device is "
                          f"{jax.devices()[0].device_kind!r}: set model.moe.gmm_consumers=1")


def build_mesh(cfg: Config, devices=None):
    """(mesh over `devices` (default: all), logical-axis rules) of a run,
    after check_config and check_devices."""
    check_config(cfg)
    check_devices(cfg)
    return sharding.make_mesh(cfg.mesh, devices), sharding.resolve_rules(cfg.mesh.rules)


def build_model(cfg: Config, seed=None) -> Transformer:
    """seed (an int or a key) defaults to train.seed; inside jit pass a traced key
    so XLA does not constant-fold the whole initialisation at compile time."""
    return Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed if seed is None else seed))


def build_optimizer(cfg: Config):
    return make_optimizer(cfg.optimizer, cfg.train.steps), make_schedule(cfg.optimizer, cfg.train.steps)


def split_model(model):
    """Graph definitions for training and evaluation mode, the parameters and
    the rest of the model state."""
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, eval_graphdef, params, model_state


def build_train_state(cfg: Config, optimizer, mesh, rules, model=None):
    """(graphdef, eval_graphdef, state, shardings): the train state
    {params, opt_state, model_state, step} of `model` (default: a fresh
    build_model(cfg); its nnx.Param are what trains) placed in its shardings
    on `mesh`, and those shardings. Raises ConfigError before compiling when
    a dimension does not divide its mesh axes.

    Parameters are initialised eagerly (op by op) and then placed: XLA takes
    minutes to compile a jitted initialiser of a 100M-parameter model on GPU.
    The optimizer state is created directly in its shardings."""
    graphdef, eval_graphdef, params, model_state = split_model(
        build_model(cfg) if model is None else model)
    step = jnp.zeros((), jnp.int32)
    abstract = jax.eval_shape(lambda p, m: dict(params=p, opt_state=optimizer.init(p),
                                                model_state=m, step=step), params, model_state)
    shardings = sharding.train_state_shardings(abstract, mesh, rules)
    params = jax.device_put(params, shardings["params"])
    state = dict(params=params,
                 opt_state=jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params),
                 model_state=jax.device_put(model_state, shardings["model_state"]),
                 step=jax.device_put(step, shardings["step"]))
    return graphdef, eval_graphdef, state, shardings


def build_data(cfg: Config):
    """Returns (train_source, eval_source) with .batch(step, process_index, process_count)."""
    from jaxkit import data
    d = cfg.data
    if d.kind == "mqar":
        if cfg.model.vocab_size < d.mqar_vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) must be >= "
                              f"data.mqar_vocab_size ({d.mqar_vocab_size})")
        make = lambda seed: data.MQARTask(vocab_size=d.mqar_vocab_size, seq_len=d.seq_len,
                                          num_kv_pairs=d.mqar_num_kv_pairs, seed=seed,
                                          global_batch_size=d.batch_size,
                                          num_queries=d.mqar_num_queries,
                                          repeat_queries=d.mqar_repeat_queries)
        return make(d.seed), make(d.seed + 1_000_003)
    root = Path(d.path)
    if not (root / "train.json").exists():
        bpe = (f" --tokenizer bpe --vocab-size {cfg.model.vocab_size}"
               if cfg.model.vocab_size > data.ByteTokenizer().vocab_size else "")
        raise ConfigError(f"data.path {d.path!r} holds no token files (train.bin/train.json); "
                          f"create them with: jaxkit data prepare{bpe} --out {d.path}")
    train_file, val_file = data.TokenFile(root / "train"), data.TokenFile(root / "val")
    try:
        tokenizer = data.load_tokenizer(root)
    except ValueError as err:
        raise ConfigError(f"data.path {d.path!r}: {err}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's "
                          f"{tokenizer.name} tokenizer vocabulary ({tokenizer.vocab_size})")
    eos_id = tokenizer.eos_id if d.document_mask else None
    return (data.TokenBatcher(train_file, d.seq_len, d.batch_size, d.seed, eos_id),
            data.TokenBatcher(val_file, d.seq_len, d.batch_size, d.seed + 1, eos_id))


class Batches:
    """A run's train and eval batches as global arrays on its mesh; each
    process loads only the rows its devices hold. `sources` (train, eval)
    replace the config's data sources (objects with .batch(step,
    process_index=, process_count=))."""

    def __init__(self, cfg: Config, mesh, rules, sources=None):
        sharding.check_batch(cfg.data.batch_size, cfg.train.grad_accum, mesh, rules)
        self.train_source, self.eval_source = build_data(cfg) if sources is None else sources
        self._to_global = sharding.GlobalBatcher(mesh, rules, cfg.data.batch_size)
        self.num_eval = cfg.train.eval_batches

    def train(self, step: int) -> dict:
        return self._to_global(self.train_source, step)

    def eval(self):
        """The train.eval_batches eval batches, one at a time."""
        return (self._to_global(self.eval_source, i) for i in range(self.num_eval))
