"""Orbax checkpointing of the train state (params, optimizer, model state,
step) and a plain format for parameters alone, for inference."""
from jaxkit.checkpoint.export import export_params, load_params
from jaxkit.checkpoint.manager import Checkpointer
from jaxkit.checkpoint.verify import DamagedCheckpointError

__all__ = ["Checkpointer", "DamagedCheckpointError", "export_params", "load_params"]
