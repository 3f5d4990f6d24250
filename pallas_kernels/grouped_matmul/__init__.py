"""Grouped matmul for dropless mixture-of-experts: reference, Pallas kernels
(portable BlockSpec and Hopper Mosaic GPU) and the public API, and the
SwiGLU's first grouped matmul with the activation in its epilogue
(gmm_swiglu)."""
from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS, gmm, tgmm
from pallas_kernels.grouped_matmul.reference import (gmm_flops, gmm_reference, group_ids,
                                                     tgmm_reference)
from pallas_kernels.grouped_matmul.swiglu import gmm_swiglu, gmm_swiglu_reference

__all__ = ["IMPLEMENTATIONS", "gmm", "tgmm", "gmm_swiglu", "gmm_reference", "tgmm_reference",
           "gmm_swiglu_reference", "group_ids", "gmm_flops"]
