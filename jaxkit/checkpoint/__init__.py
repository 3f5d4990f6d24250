"""Orbax checkpointing of the train state (params, optimizer, model state,
step) and a plain format for parameters alone, for inference."""
from jaxkit.checkpoint.export import export_params, load_params
from jaxkit.checkpoint.manager import Checkpointer

__all__ = ["Checkpointer", "export_params", "load_params"]
