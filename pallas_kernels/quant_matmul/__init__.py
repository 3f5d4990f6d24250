"""Quantised matmuls: references, Pallas kernels, packing and the public API."""
from pallas_kernels.quant_matmul.api import (
    IMPLEMENTATIONS,
    fp8_blockwise_matmul,
    int4_weight_only_matmul,
    w8a8_matmul,
)
from pallas_kernels.quant_matmul.packing import pack_int4, unpack_int4
from pallas_kernels.quant_matmul.reference import (
    FP8_BLOCK,
    dequantize_int4,
    fp8_blockwise_reference,
    int4_weight_only_reference,
    w8a8_reference,
)

__all__ = [
    "FP8_BLOCK",
    "IMPLEMENTATIONS",
    "dequantize_int4",
    "fp8_blockwise_matmul",
    "fp8_blockwise_reference",
    "int4_weight_only_matmul",
    "int4_weight_only_reference",
    "pack_int4",
    "unpack_int4",
    "w8a8_matmul",
    "w8a8_reference",
]
