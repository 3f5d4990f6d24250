"""Block-sparse attention: each query block attends to a list of key blocks
(ProxyAttn / InfLLM-V2 style selection, made elsewhere); reference, Pallas
kernels and the public API. Design notes: docs/design/block-sparse-attention.md.
"""
from pallas_kernels.block_sparse_attention.api import IMPLEMENTATIONS, block_sparse_attention
from pallas_kernels.block_sparse_attention.reference import block_sparse_attention_reference

__all__ = ["IMPLEMENTATIONS", "block_sparse_attention", "block_sparse_attention_reference"]
