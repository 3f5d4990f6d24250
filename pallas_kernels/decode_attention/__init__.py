"""Decode attention (flash-decoding) over contiguous or paged, plain or
quantized KV caches: reference, Pallas kernels and the public API."""
from pallas_kernels.decode_attention.api import IMPLEMENTATIONS, decode_attention
from pallas_kernels.decode_attention.kv_formats import (FORMATS, QuantizedKV, dequantize_kv,
                                                        kv_bytes_per_token, quantize_kv)
from pallas_kernels.decode_attention.reference import (decode_attention_reference,
                                                       decode_attention_reference_with_lse)

__all__ = ["IMPLEMENTATIONS", "decode_attention", "QuantizedKV", "FORMATS", "quantize_kv",
           "dequantize_kv", "kv_bytes_per_token", "decode_attention_reference",
           "decode_attention_reference_with_lse"]
