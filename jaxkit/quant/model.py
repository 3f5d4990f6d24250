"""Model-level quantisation: attach quantizers to a float model, calibrate
them from a few batches (PTQ), and convert Linear kernels to low-bit storage.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

from flax import nnx

from jaxkit.quant.config_check import check_head_target, check_quant_config
from jaxkit.quant.experts import ExpertQuantizer
from jaxkit.quant.layer import Quantizer


def _linears(model):
    """The model's Linear layers, each holding one layer's kernel (not a stack)."""
    from jaxkit.layers.linear import Linear  # jaxkit.layers imports this package
    linears = [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    for lin in linears:
        if lin.kernel is not None and lin.kernel.ndim != 2:
            raise ValueError(
                f"Linear '{lin.target}' holds a stacked kernel of shape {lin.kernel.shape}: the "
                "model scans its layers (model.scan_layers=true); calibration and conversion work "
                "per layer, so unroll it first with jaxkit.models.unscan_layers(model)")
    return linears


def _moes(model):
    """The model's MoE layers (their routed experts are quant target 'experts')."""
    from jaxkit.layers.moe import MoE
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]


def _expert_weights(moe):
    if moe.gate is None:
        raise ValueError("the MoE experts were already converted to low-bit storage")
    return moe.gate[...], moe.up[...], moe.down[...]


def _applies(cfg, linear) -> bool:
    return cfg.mode != "none" and linear.target in cfg.targets


def _check_head(model, cfg) -> None:
    """Target 'head' must name a layer: a tied head (the embedding) has none."""
    cfg_model = getattr(model, "cfg", None)
    if cfg_model is not None and hasattr(cfg_model, "tie_embeddings"):
        check_head_target(cfg, cfg_model.tie_embeddings)


def attach_quantizers(model, cfg, *, rngs: nnx.Rngs) -> int:
    """Give every Linear whose target cfg names a fresh Quantizer (e.g. PTQ of
    a model trained in float). Returns how many layers were attached."""
    check_quant_config(cfg)
    _check_head(model, cfg)
    count = 0
    for lin in _linears(model):
        if _applies(cfg, lin):
            if lin.kernel is None:
                raise ValueError(f"Linear '{lin.target}' was already converted to low-bit storage")
            lin.quantizer = Quantizer(*lin.kernel.shape, cfg, rngs=rngs)
            count += 1
    if cfg.mode != "none" and "experts" in cfg.targets:
        for moe in _moes(model):
            _, D, H = _expert_weights(moe)[0].shape
            moe.quantizer = ExpertQuantizer(D, H, cfg, rngs=rngs)
            count += 1
    return count


def quantizers(model) -> list[Quantizer]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Quantizer)]


def calibrate(model, batches: Iterable, forward: Callable | None = None) -> int:
    """Run ``forward(model, batch)`` (default ``model(batch)``) on the first
    ``calibration_batches`` batches to fix SmoothQuant factors (first pass) and
    static per-tensor activation scales (second pass, with smoothing and
    rotation already applied). Returns the number of batches used."""
    _linears(model)  # refuses scanned layer stacks
    qs = quantizers(model)
    if not qs:
        raise ValueError("calibrate: the model has no quantized layers")
    forward = forward or (lambda m, b: m(b))
    batches = list(itertools.islice(batches, qs[0].cfg.calibration_batches))
    if not batches:
        raise ValueError("calibrate: no batches given")
    for phase, needs in (("observe_channels", Quantizer.needs_channel_stats),
                         ("observe_activations", Quantizer.needs_activation_stats)):
        active = [q for q in qs if needs(q)]
        if not active:
            continue
        for q in active:
            q.begin_phase(phase)
        for b in batches:
            forward(model, b)
        for q in active:
            q.end_phase()
    return len(batches)


def _conversion_quantizer(q, make, cfg, what: str):
    """The quantizer that converts a layer to cfg (mode 'int'): its own, which
    must differ from cfg in the mode alone, or make() when it has none."""
    if q is None:
        q = make()
    elif dataclasses.replace(q.cfg, mode="int") != cfg:
        raise ValueError(f"{what} was prepared with {q.cfg}, which differs from {cfg} in more "
                         "than the mode")
    q.cfg = cfg
    return q


def quantize_model(model, cfg) -> int:
    """Replace the float kernel of every Linear cfg targets (and, with target
    'experts', every MoE layer's routed experts) by low-bit storage (cfg.mode
    must be 'int'); layers calibrated earlier keep their SmoothQuant
    statistics, activation scales and rotation. Returns the count converted."""
    check_quant_config(cfg)
    if cfg.mode != "int":
        raise ValueError(f"quantize_model needs a QuantConfig with mode 'int', got {cfg.mode!r}")
    _check_head(model, cfg)
    count = 0
    for lin in _linears(model):
        if lin.target not in cfg.targets:
            continue
        if lin.kernel is None:
            raise ValueError(f"Linear '{lin.target}' was already converted")
        q = _conversion_quantizer(lin.quantizer,
                                  lambda: Quantizer(*lin.kernel.shape, cfg, rngs=nnx.Rngs(0)),
                                  cfg, f"Linear '{lin.target}'")
        q.convert(lin.kernel[...])
        lin.quantizer = q
        lin.kernel = None
        count += 1
    if "experts" in cfg.targets:
        for moe in _moes(model):
            weights = _expert_weights(moe)
            _, D, H = weights[0].shape
            q = _conversion_quantizer(moe.quantizer,
                                      lambda: ExpertQuantizer(D, H, cfg, rngs=nnx.Rngs(0)),
                                      cfg, "MoE experts")
            q.convert(weights)
            moe.quantizer = q
            moe.gate = moe.up = moe.down = None
            count += 1
    return count
