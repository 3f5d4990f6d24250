"""Model FLOPs per token and model-FLOPs utilisation (MFU).

Counts matmul FLOPs of forward + backward (3x forward): 6 per parameter that
takes part in a matmul per token (active experts only for MoE; the embedding
lookup is free but a tied output head is a matmul), plus causal attention:
QK^T and PV are each 2*S*H*Dh per token forward, halved by the causal mask.
"""
from __future__ import annotations

from jaxkit.config import ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by device kind substring.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5": 197.0, "TPU v4": 275.0,
               "TPU v6": 918.0}


def matmul_params_per_token(cfg: ModelConfig) -> int:
    d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    attn = d * h * dh * 2 + d * kv * dh * 2  # q, o and k, v projections
    dense_mlp = 3 * d * cfg.mlp_hidden
    m = cfg.moe
    total = 0
    for layer in range(cfg.num_layers):
        total += attn
        if cfg.is_moe_layer(layer):
            total += d * m.num_experts  # router
            total += 3 * d * m.expert_hidden * (m.top_k + m.num_shared_experts)
        else:
            total += dense_mlp
    return total + d * cfg.vocab_size  # output head (tied or not)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attention = cfg.num_layers * 2 * 2 * seq_len * cfg.num_heads * cfg.dim_per_head / 2
    return 3 * (2 * matmul_params_per_token(cfg) + attention)


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
