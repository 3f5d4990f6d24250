"""Grouped matmul for dropless mixture-of-experts: reference, Pallas kernels
(portable BlockSpec and Hopper Mosaic GPU) and the public API."""
from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS, gmm, tgmm
from pallas_kernels.grouped_matmul.reference import (gmm_flops, gmm_reference, group_ids,
                                                     tgmm_reference)

__all__ = ["IMPLEMENTATIONS", "gmm", "tgmm", "gmm_reference", "tgmm_reference", "group_ids",
           "gmm_flops"]
