"""Model FLOPs per token and model-FLOPs utilisation (MFU).

Counts matmul FLOPs of forward + backward (3x forward): 6 per parameter that
takes part in a matmul per token (active experts only for MoE; the embedding
lookup is free but a tied output head is a matmul), plus each layer's token
mixing. Softmax attention: QK^T and PV are each 2*H*Dh per visible key per
token forward; causal, a token sees S/2 keys on average, fewer under a
sliding window, and a block-sparse layer counts the keys its policy keeps.
Chunked gated linear attention (chunk C): the causal intra-chunk products
(2*C*Dh/2 each for QK^T and PV) plus reading and updating the Dh x Dh state
(2*Dh*Dh each), per head and token.
"""
from __future__ import annotations

from jaxkit.config import ModelConfig
from jaxkit.layers.sparse_attention.attend import runs_dense

# Dense bf16 tensor-core peaks (TFLOP/s) by device kind substring.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5": 197.0, "TPU v4": 275.0,
               "TPU v6": 918.0}


def matmul_params_per_token(cfg: ModelConfig) -> int:
    d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    attn = d * h * dh * 2 + d * kv * dh * 2  # q, o and k, v projections
    decays = h if cfg.linear_attention.decay == "scalar" else h * dh
    linear = d * h * dh * 5 + d * decays  # q, k, v, gate, o and the decay gate
    dense_mlp = 3 * d * cfg.mlp_hidden
    m = cfg.moe
    total = 0
    for layer in range(cfg.num_layers):
        total += linear if cfg.is_linear_layer(layer) else attn
        if cfg.is_moe_layer(layer):
            total += d * m.num_experts  # router
            total += 3 * d * m.expert_hidden * (m.top_k + m.num_shared_experts)
        else:
            total += dense_mlp
    return total + d * cfg.vocab_size  # output head (tied or not)


def visible_keys(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Keys a token of a softmax-attention layer attends to, on average over a
    causal sequence of seq_len."""
    window = cfg.attention.sliding_window
    keys = seq_len / 2
    if window is not None and window < seq_len:
        keys = window * (1 - window / (2 * seq_len))  # min(position, window), averaged
    sp = cfg.attention.sparse
    if cfg.is_sparse_attention_layer(layer) and not runs_dense(sp, seq_len):
        kept = sp.window + sp.sinks
        if sp.policy != "window_sinks":
            kept = max(kept, sp.top_k_blocks * sp.block_size)
        keys = min(keys, kept)
    return keys


def mixing_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs a token spends mixing with other tokens, over all layers."""
    h, dh = cfg.num_heads, cfg.dim_per_head
    chunk = min(cfg.linear_attention.chunk_size, seq_len)
    total = 0.0
    for layer in range(cfg.num_layers):
        if cfg.is_linear_layer(layer):
            total += h * (2 * chunk * dh + 4 * dh * dh)
        else:
            total += 2 * 2 * h * dh * visible_keys(cfg, layer, seq_len)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * (2 * matmul_params_per_token(cfg) + mixing_flops_per_token(cfg, seq_len))


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs):
    then no MFU is reported."""
    if override is not None:
        return override
    return next((value for key, value in PEAK_TFLOPS.items()
                 if key.lower() in device_kind.lower()), None)


def mfu(tokens_per_second: float, cfg: ModelConfig, seq_len: int, num_devices: int,
        device_peak_tflops: float) -> float:
    achieved = tokens_per_second * flops_per_token(cfg, seq_len)
    return achieved / (num_devices * device_peak_tflops * 1e12)
