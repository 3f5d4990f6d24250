"""A training run's checkpoint restored onto a mesh, for the commands that
read a run (eval, export, quantize), and a model with the values of a run,
of exported parameters or of a quantised model, on one device (eval,
generate, convert)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxkit import sharding
from jaxkit.checkpoint import Checkpointer, load_params
from jaxkit.config import CheckpointConfig, Config, ConfigError, MeshConfig
from jaxkit.models import Transformer
from jaxkit.quant import calibrate, quantize_model, quantizers
from jaxkit.run.build import build_mesh, build_model, check_config, split_model

QUANTIZED_MODES = ("ptq", "int")  # what `jaxkit quantize --out` writes: a whole model state


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """The model of a run in eval mode, split into its graph and state, laid
    out on `mesh` by `rules`, as saved at checkpoint `step`."""
    graphdef: nnx.GraphDef
    params: nnx.State
    model_state: nnx.State
    mesh: Mesh
    rules: dict
    step: int

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.model_state)


def load_run(cfg: Config, run_dir: str | Path, step: int | None = None, *,
             devices=None) -> LoadedRun:
    """Restores the parameters and model state of checkpoint `step` (default:
    the latest) of the run in run_dir onto cfg's mesh over `devices`
    (default: all). The optimizer state is never read, so this needs memory
    for the model only. Reads only: writes and removes nothing in run_dir.
    FileNotFoundError when there is no such checkpoint, or (its subclass
    DamagedCheckpointError) when it is damaged; the latest is the newest
    intact one, newer damaged ones skipped with a warning."""
    if cfg.lora.base is not None:
        raise ConfigError(f"{run_dir} holds a LoRA run (lora.base is set), whose checkpoints hold "
                          "the adapters alone: `jaxkit export` merges them into parameters that "
                          "--params reads")
    mesh, rules = build_mesh(cfg, devices)
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint under {directory}")
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False), read_only=True)
    try:
        step = checkpointer.intact_step(step)
        with sharding.activate(mesh, rules):
            _, graphdef, params, model_state = split_model(nnx.eval_shape(lambda: build_model(cfg)))
        place = lambda tree, required: sharding.abstract_state(
            tree, sharding.variable_shardings(tree, mesh, rules, required=required))
        state = checkpointer.restore_subset(step, dict(params=place(params, True),
                                                       model_state=place(model_state, False)))
    finally:
        checkpointer.close()
    return LoadedRun(graphdef, state["params"], state["model_state"], mesh, rules, step)


def _quantized_layout(cfg: Config) -> Transformer:
    """A model laid out as `jaxkit quantize` leaves one with cfg.model.quant:
    unrolled layers, quantizers calibrated and, in mode 'int', converted.
    Its values are placeholders for the saved ones (calibrated on zeros)."""
    q = cfg.model.quant
    model = Transformer(dataclasses.replace(cfg.model, scan_layers=False,
                                            quant=dataclasses.replace(q, mode="ptq")),
                        rngs=nnx.Rngs(0))
    if quantizers(model):
        calibrate(model, [jnp.zeros((1, 8), jnp.int32)])
    if q.mode == "int":
        quantize_model(model, q)
    return model


def load_model(cfg: Config, *, run_dir: str | Path | None = None,
               params: str | Path | None = None) -> Transformer:
    """cfg's model on the first device, with the values of the latest intact
    checkpoint in run_dir, or of `params`: a `jaxkit export` directory, or
    (cfg.model.quant.mode 'ptq' or 'int', as given to it) a `jaxkit quantize
    --out` directory."""
    cfg = dataclasses.replace(cfg, mesh=MeshConfig())  # data parallel over one device
    check_config(cfg)
    if params is None:
        return load_run(cfg, run_dir, devices=jax.devices()[:1]).model()
    if not Path(params).is_dir():
        raise FileNotFoundError(f"no parameters under {params}")
    quantized = cfg.model.quant.mode in QUANTIZED_MODES
    model = _quantized_layout(cfg) if quantized else build_model(cfg)
    try:
        return load_params(params, model, nnx.Variable if quantized else nnx.Param)
    except ValueError as e:  # orbax: the saved tree or shapes differ from the model's
        raise ConfigError(f"the arrays in {params} do not fit the model the config describes (a "
                          "`jaxkit quantize --out` directory needs the model.quant settings given "
                          f"to quantize): {str(e).splitlines()[0]}") from None
