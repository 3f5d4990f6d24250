"""Parameters alone, for inference: write them as a plain checkpoint, load them
into a model."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx


def export_params(state: nnx.State, directory: str | Path) -> Path:
    """Writes `state` (the parameters, or a whole model state) as a plain
    nested dict of arrays (an orbax checkpoint); returns the absolute path."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, nnx.to_pure_dict(state))
        checkpointer.wait_until_finished()
    return directory


def load_params(directory: str | Path, model: nnx.Module, variables=nnx.Param) -> nnx.Module:
    """Loads exported parameters into `model` (in place; also returned), onto
    the shardings its parameters have now. variables: the nnx filter of what
    the directory holds (nnx.Variable for a whole model state)."""
    params = nnx.state(model, variables)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.to_pure_dict(params))
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.replace_by_pure_dict(params, checkpointer.restore(Path(directory).absolute(), target))
    nnx.update(model, params)
    return model
