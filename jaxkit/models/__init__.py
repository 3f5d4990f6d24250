"""Model definitions."""
from jaxkit.models.transformer import Transformer, count_params, unscan_layers

__all__ = ["Transformer", "count_params", "unscan_layers"]
