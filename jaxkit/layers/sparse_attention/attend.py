"""The layer-level call: a model.attention.sparse config's policy run on the
layer's q and k, then block_sparse_attention over its lists (causal self-
attention; one block size for queries and keys)."""
from __future__ import annotations

from jaxkit.config import SparseAttentionConfig
from jaxkit.layers.sparse_attention.policies import infllm_v2, proxy, window_sinks
from pallas_kernels.attention import flash_attention
from pallas_kernels.block_sparse_attention import block_sparse_attention


def select_blocks(q, k, cfg: SparseAttentionConfig):
    """(block_indices, block_counts) of cfg.policy for q [B, S, Hq, D] and
    k [B, S, Hkv, D]."""
    common = dict(block_size=cfg.block_size, window=cfg.window, sinks=cfg.sinks)
    if cfg.policy == "window_sinks":
        return window_sinks(q, k, **common)
    if cfg.policy == "infllm_v2":
        return infllm_v2(q, k, top_k_blocks=cfg.top_k_blocks, dense_below=cfg.dense_below,
                         group_score=cfg.group_score, **common)
    if cfg.policy == "proxy":
        return proxy(q, k, top_k_blocks=cfg.top_k_blocks, dense_below=cfg.dense_below,
                     coverage=cfg.coverage, proxy_heads=cfg.proxy_heads, **common)
    raise ValueError(f"model.attention.sparse.policy {cfg.policy!r} selects no blocks")


def runs_dense(cfg: SparseAttentionConfig, kv_len: int) -> bool:
    """Whether a top-k policy keeps every causal block at this length (a
    static decision on the shape): then flash attention does the same work
    without lists."""
    return cfg.policy in ("infllm_v2", "proxy") and kv_len <= cfg.dense_below


def sparse_self_attention(q, k, v, segment_ids, cfg: SparseAttentionConfig,
                          implementation: str = "auto"):
    """Causal attention of q [B, S, Hq, D] to k, v [B, S, Hkv, D] over the
    key blocks cfg.policy selects; segment_ids (int [B, S] or None) mask
    within the selected blocks. implementation: block_sparse_attention's."""
    if runs_dense(cfg, k.shape[1]):
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                               implementation=implementation)
    indices, counts = select_blocks(q, k, cfg)
    return block_sparse_attention(q, k, v, indices, counts, block_q=cfg.block_size,
                                  block_k=cfg.block_size, causal=True, segment_ids=segment_ids,
                                  implementation=implementation)
