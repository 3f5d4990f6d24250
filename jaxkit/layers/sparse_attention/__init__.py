"""Block-sparse self-attention for long contexts: selection policies that
choose each query block's key blocks from the layer's own q and k (pure
functions, no parameters), and the layer-level call that runs the selection
and pallas_kernels.block_sparse_attention. Design: docs/design/block-selection.md.
"""
from jaxkit.layers.sparse_attention.attend import select_blocks, sparse_self_attention
from jaxkit.layers.sparse_attention.policies import infllm_v2, proxy, window_sinks

__all__ = ["infllm_v2", "proxy", "select_blocks", "sparse_self_attention", "window_sinks"]
