"""Pallas kernels for efficient transformers, one folder per op.

Each op folder holds a pure-jnp reference (the spec), Pallas kernel(s) and a
public function with ``implementation=`` dispatch.
"""
from pallas_kernels.attention import flash_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.grouped_matmul import gmm

__all__ = ["flash_attention", "decode_attention", "gmm"]
