"""Grouped matmul with low-bit weights (MoE experts in quant mode 'int'):
reference, portable Pallas kernel and the public API."""
from pallas_kernels.quant_grouped_matmul.api import IMPLEMENTATIONS, qgmm, unsupported
from pallas_kernels.quant_grouped_matmul.reference import (KINDS, dequantize_groups,
                                                           pack_int4_groups, qgmm_reference)

__all__ = ["IMPLEMENTATIONS", "KINDS", "dequantize_groups", "pack_int4_groups", "qgmm",
           "qgmm_reference", "unsupported"]
