"""Quantisation: number formats, quantise/dequantise, straight-through fake
quantisation, Hadamard rotation, SmoothQuant, calibration and conversion to
low-bit storage served by pallas_kernels.quant_matmul."""
from jaxkit.quant.config_check import TARGETS, check_quant_config, int_kernel
from jaxkit.quant.core import (
    GRANULARITIES,
    SCALE_METHODS,
    QTensor,
    dequantize,
    fake_quant,
    quantize,
    snr_db,
    tensor_statistic,
)
from jaxkit.quant.experts import ExpertQuant, ExpertQuantizer
from jaxkit.quant.formats import FORMATS, Element, Format, get_format
from jaxkit.quant.layer import (
    Quantizer,
    QuantScale,
    QuantStat,
    QuantWeight,
    quantize_gradient,
)
from jaxkit.quant.model import attach_quantizers, calibrate, quantize_model, quantizers
from jaxkit.quant.rotation import (
    fwht,
    hadamard_block_size,
    random_signs,
    rotate_activation,
    rotate_weight,
)
from jaxkit.quant.smoothquant import smooth, smoothing_factors

__all__ = [
    "FORMATS",
    "GRANULARITIES",
    "SCALE_METHODS",
    "TARGETS",
    "Element",
    "ExpertQuant",
    "ExpertQuantizer",
    "Format",
    "QTensor",
    "QuantScale",
    "QuantStat",
    "QuantWeight",
    "Quantizer",
    "attach_quantizers",
    "calibrate",
    "check_quant_config",
    "dequantize",
    "fake_quant",
    "fwht",
    "get_format",
    "hadamard_block_size",
    "int_kernel",
    "quantize",
    "quantize_gradient",
    "quantize_model",
    "quantizers",
    "random_signs",
    "rotate_activation",
    "rotate_weight",
    "smooth",
    "smoothing_factors",
    "snr_db",
    "tensor_statistic",
]
