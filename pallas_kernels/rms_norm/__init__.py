"""RMSNorm and the residual add fused with it: reference, Pallas kernels and
the public API. docs/design/rms-norm.md describes the fusion and the layout."""
from pallas_kernels.rms_norm.api import IMPLEMENTATIONS, add_rms_norm, rms_norm
from pallas_kernels.rms_norm.reference import rms_norm_bytes

__all__ = ["IMPLEMENTATIONS", "add_rms_norm", "rms_norm", "rms_norm_bytes"]
