"""Parameters alone, for inference: export from a training run, load into a model."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxkit import sharding
from jaxkit.build import build_mesh, build_model, split_model
from jaxkit.checkpoint.manager import Checkpointer
from jaxkit.config import CheckpointConfig, Config


def export_params(params: nnx.State, directory: str | Path) -> Path:
    """Writes `params` as a plain nested dict of arrays (an orbax checkpoint)."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()
    return directory


def load_params(directory: str | Path, model: nnx.Module) -> nnx.Module:
    """Loads exported parameters into `model` (in place; also returned), onto
    the shardings its parameters have now."""
    params = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.to_pure_dict(params))
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.replace_by_pure_dict(params, checkpointer.restore(Path(directory).absolute(), target))
    nnx.update(model, params)
    return model


def export_run(cfg: Config, run_dir: str | Path, out: str | Path, *, step: int | None = None,
               devices=None) -> int:
    """Exports the parameters of checkpoint `step` (default: the latest) of
    the run in `run_dir` to `out`; returns the step. The optimizer state is
    never read, so this needs memory for the parameters only."""
    mesh, rules = build_mesh(cfg, devices)
    directory = Path(run_dir) / "checkpoints"
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' {step}'} "
                                    f"under {directory}")
        with sharding.activate(mesh, rules):
            params = split_model(nnx.eval_shape(lambda: build_model(cfg)))[2]
            target = sharding.abstract_state(
                params, sharding.variable_shardings(params, mesh, rules, required=True))
            params = checkpointer.restore_params(step, target)
        export_params(params, out)
    finally:
        checkpointer.close()
    return step
