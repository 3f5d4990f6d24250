"""A training run's checkpoint restored onto a mesh, for the commands that
read a run (eval, export, quantize)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from jaxkit import sharding
from jaxkit.checkpoint import Checkpointer
from jaxkit.config import CheckpointConfig, Config
from jaxkit.run.build import build_mesh, build_model, split_model


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
    mesh, rules = build_mesh(cfg, devices)
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint under {directory}")
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False), read_only=True)
    try:
        if step is None:
            step = checkpointer.latest_verified_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {directory}")
        else:
            checkpointer.verify(step)
        with sharding.activate(mesh, rules):
            _, graphdef, params, model_state = split_model(nnx.eval_shape(lambda: build_model(cfg)))
        place = lambda tree, required: sharding.abstract_state(
            tree, sharding.variable_shardings(tree, mesh, rules, required=required))
        state = checkpointer.restore_subset(step, dict(params=place(params, True),
                                                       model_state=place(model_state, False)))
    finally:
        checkpointer.close()
    return LoadedRun(graphdef, state["params"], state["model_state"], mesh, rules, step)
