"""train.init_from: a run that starts from the parameters of another run's
latest intact checkpoint instead of a random initialisation. Only the
parameters are taken: the optimizer starts fresh (step 0, zero moments) and
the model state (MoE balancing biases, quantiser statistics, ...) is the one
the config builds, so a fine-tune may change every key that leaves the
parameters' tree and shapes alone (sequence length, attention
implementation or sparsity, remat, dtypes: arrays are cast to the model's).

A run that holds a checkpoint of its own resumes from it instead: a
fine-tune restarted with --resume goes on where it stopped."""
from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from jaxkit import sharding
from jaxkit.checkpoint import Checkpointer
from jaxkit.checkpoint.run_dir import checkpoint_steps
from jaxkit.config import CheckpointConfig, Config, ConfigError
from jaxkit.models import Transformer
from jaxkit.run.build import build_model, split_model
from jaxkit.sharding.state import path_str


def starts_from_run(cfg: Config, run_dir: Path) -> bool:
    """Whether the run in run_dir starts from train.init_from: it is set and
    the run has no checkpoint of its own to resume."""
    return cfg.train.init_from is not None and not (cfg.checkpoint.enabled
                                                    and checkpoint_steps(Path(run_dir)))


def _shapes(tree) -> dict[str, tuple]:
    """'blocks.0.attn.q.kernel' -> shape of each array of a parameter tree
    (an nnx.State, or the nested dicts of a checkpoint's metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(path).removesuffix(".value"): tuple(leaf.shape)
            for path, leaf in flat}


def _first_difference(saved: dict, model: dict) -> str | None:
    """None when the saved parameters (name -> shape) are those of the model,
    else the first difference, in words."""
    for name in sorted(saved.keys() | model.keys()):
        if name not in model:
            return f"its parameter {name} is not in this model"
        if name not in saved:
            return f"this model's parameter {name} is not in it"
        if saved[name] != model[name]:
            return f"parameter {name} is {saved[name]} there and {model[name]} here"
    return None


def init_from_model(cfg: Config, mesh, rules) -> Transformer:
    """cfg's model with the parameters of train.init_from's latest intact
    checkpoint, laid out on `mesh` by `rules` (call with them active).
    ConfigError, before anything is built, when that run has no intact
    checkpoint or its parameters' tree or shapes differ from cfg's model."""
    source = Path(cfg.train.init_from)
    where = f"train.init_from {str(source)!r}"
    if not (source / "checkpoints").is_dir():
        state = "holds no checkpoints" if source.is_dir() else "does not exist"
        raise ConfigError(f"{where} {state} (a run directory with checkpoints/ is expected)")
    checkpointer = Checkpointer(source / "checkpoints", CheckpointConfig(async_save=False),
                                read_only=True)
    try:
        try:
            step = checkpointer.intact_step()
        except FileNotFoundError as e:  # and DamagedCheckpointError
            raise ConfigError(f"{where}: {e}") from None
        abstract = split_model(nnx.eval_shape(lambda: build_model(cfg)))[2]
        difference = _first_difference(_shapes(checkpointer.tree_metadata(step)["params"]),
                                       _shapes(abstract))
        if difference:
            raise ConfigError(f"{where}: checkpoint {step} does not fit the model this config "
                              f"describes: {difference}")
        model = build_model(cfg)
        params = nnx.state(model, nnx.Param)
        target = sharding.abstract_state(
            params, sharding.variable_shardings(params, mesh, rules, required=True))
        nnx.update(model, checkpointer.restore_subset(step, dict(params=target))["params"])
    finally:
        checkpointer.close()
    return model
