"""Grouped matmul for dropless mixture-of-experts: reference, Pallas kernels
(portable BlockSpec and Hopper Mosaic GPU) and the public API, and the
experts' SwiGLU feed-forward with the activation and its gradient in the
grouped matmuls' epilogues (swiglu_ffn)."""
from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS, gmm, tgmm
from pallas_kernels.grouped_matmul.reference import (gmm_flops, gmm_reference, group_ids,
                                                     tgmm_reference)
from pallas_kernels.grouped_matmul.swiglu import swiglu_ffn, swiglu_ffn_reference

__all__ = ["IMPLEMENTATIONS", "gmm", "tgmm", "swiglu_ffn", "gmm_reference", "tgmm_reference",
           "swiglu_ffn_reference", "group_ids", "gmm_flops"]
