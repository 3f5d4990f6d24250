"""Row gather (optionally summing weighted sources per row): reference, a
portable Pallas kernel and the public API. What MoE dispatch moves between
token order and expert order."""
from pallas_kernels.row_gather.api import IMPLEMENTATIONS, row_gather
from pallas_kernels.row_gather.reference import row_gather_bytes

__all__ = ["IMPLEMENTATIONS", "row_gather", "row_gather_bytes"]
