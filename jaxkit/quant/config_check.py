"""Checks of a QuantConfig that its types alone cannot express."""
from __future__ import annotations

from jaxkit.quant.core import ROUNDINGS, resolve_grouping
from jaxkit.quant.formats import get_format

TARGETS = ("q", "k", "v", "o", "mlp", "experts", "head")
MODES = ("none", "qat", "ptq", "int")
FP8_BLOCK = 128  # the fp8 kernel's K block (pallas_kernels.quant_matmul.FP8_BLOCK)

# mode 'int': the (weight, activation, granularity) combinations with a
# quant_matmul kernel behind them.
INT_KERNELS = {
    "w8a8": "weight_format=int8, activation_format=int8, granularity tensor/channel/token "
            "(per-channel weight and per-token activation scales)",
    "fp8_blockwise": "weight_format=fp8_e4m3, activation_format=fp8_e4m3, granularity=block, "
                     "block_size=128 (1x128 activation and 128x128 weight blocks)",
    "int4_weight_only": "weight_format=int4 or int4_asym, no activation_format, "
                        "granularity=block, block_size=group size (a power of two >= 16)",
}


def int_kernel(cfg) -> str:
    """Which quant_matmul kernel serves cfg in mode 'int'; ValueError if none."""
    w, a, g, b = cfg.weight_format, cfg.activation_format, cfg.granularity, cfg.block_size
    if w == "int8" and a == "int8" and g in (None, "tensor", "channel", "token"):
        return "w8a8"
    if w == "fp8_e4m3" and a == "fp8_e4m3" and g == "block" and b == FP8_BLOCK:
        return "fp8_blockwise"
    if w in ("int4", "int4_asym") and a is None and g == "block" and b is not None \
            and b >= 16 and not b & (b - 1):
        return "int4_weight_only"
    supported = "; ".join(f"{k}: {v}" for k, v in INT_KERNELS.items())
    raise ValueError(f"mode 'int' has no kernel for weight_format={w!r}, activation_format={a!r}, "
                     f"granularity={g!r}, block_size={b!r}; supported: {supported}")


def check_head_target(cfg, tie_embeddings: bool) -> None:
    """A tied output head is the embedding table itself: no Linear to quantise."""
    if cfg.mode != "none" and "head" in cfg.targets and tie_embeddings:
        raise ValueError("quant target 'head' needs an untied output head: set "
                         "model.tie_embeddings=false, or remove 'head' from model.quant.targets")


def check_gradient_rounding(cfg) -> None:
    """gradient_rounding: a known mode; 'stochastic' rounds a symmetric gradient_format."""
    if cfg.gradient_rounding not in ROUNDINGS:
        raise ValueError(f"gradient_rounding {cfg.gradient_rounding!r} is not one of {ROUNDINGS}")
    if cfg.gradient_rounding == "nearest":
        return
    if cfg.gradient_format is None:
        raise ValueError(f"gradient_rounding {cfg.gradient_rounding!r} needs a gradient_format")
    if get_format(cfg.gradient_format).asymmetric:
        raise ValueError(f"gradient_rounding 'stochastic' needs a symmetric gradient_format, "
                         f"got {cfg.gradient_format!r}")


def check_quant_config(cfg) -> None:
    """Raise ValueError naming the first impossible setting of a QuantConfig."""
    if cfg.mode not in MODES:
        raise ValueError(f"quant mode {cfg.mode!r} is not one of {MODES}")
    for name in ("weight_format", "activation_format", "gradient_format"):
        value = getattr(cfg, name)
        if value is not None:
            fmt = get_format(value)
            if name != "gradient_format":
                resolve_grouping(fmt, cfg.granularity, cfg.block_size)
    unknown = [t for t in cfg.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown quant targets {unknown}; valid targets: {TARGETS}")
    if not 0 < cfg.percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {cfg.percentile}")
    if cfg.calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {cfg.calibration_batches}")
    if cfg.mode == "none":
        return
    if cfg.weight_format is None and cfg.activation_format is None:
        raise ValueError(f"quant mode {cfg.mode!r} needs a weight_format or an activation_format")
    if cfg.gradient_format is not None and cfg.mode != "qat":
        raise ValueError(f"gradient_format only applies to mode 'qat', got mode {cfg.mode!r}")
    check_gradient_rounding(cfg)
    if cfg.smoothquant_alpha is not None:
        if cfg.mode == "qat":
            raise ValueError("smoothquant_alpha needs calibrated activations: use mode 'ptq' or 'int'")
        if not 0 <= cfg.smoothquant_alpha <= 1:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {cfg.smoothquant_alpha}")
    if cfg.mode == "int":
        int_kernel(cfg)
