"""Orbax checkpointing of the train state (params, optimizer, model state, step)."""
from jaxkit.checkpoint.manager import Checkpointer

__all__ = ["Checkpointer"]
