"""Decode attention (flash-decoding) over contiguous or paged, plain,
int8/fp8 or KIVI-2 KV caches: reference, Pallas kernels and the public API.
docs/design/decode-attention.md describes the layout and the kernels."""
from pallas_kernels.decode_attention.api import IMPLEMENTATIONS, decode_attention
from pallas_kernels.decode_attention.kv_formats import (FORMATS, Kivi2Keys, Kivi2Values,
                                                        QuantizedKV, dequantize_kv, kivi2_append,
                                                        kivi2_cache, kivi2_residual_bytes,
                                                        kv_bytes_per_token, quantize_kv)
from pallas_kernels.decode_attention.reference import (decode_attention_reference,
                                                       decode_attention_reference_with_lse)

__all__ = ["IMPLEMENTATIONS", "decode_attention", "QuantizedKV", "FORMATS", "quantize_kv",
           "dequantize_kv", "kv_bytes_per_token", "Kivi2Keys", "Kivi2Values", "kivi2_cache",
           "kivi2_append", "kivi2_residual_bytes", "decode_attention_reference",
           "decode_attention_reference_with_lse"]
