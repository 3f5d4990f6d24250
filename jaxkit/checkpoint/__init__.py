"""Orbax checkpointing of the train state (params, optimizer, model state,
step) and export of the parameters alone for inference."""
from jaxkit.checkpoint.export import export_params, export_run, load_params
from jaxkit.checkpoint.manager import Checkpointer

__all__ = ["Checkpointer", "export_params", "export_run", "load_params"]
