"""Model definitions."""
from jaxkit.models.transformer import Transformer, count_params

__all__ = ["Transformer", "count_params"]
