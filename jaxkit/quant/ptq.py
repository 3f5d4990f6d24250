"""Quantizers for post-training quantisation of a trained model."""
from __future__ import annotations

import dataclasses

from flax import nnx

from jaxkit.config import ConfigError, QuantConfig
from jaxkit.quant.experts import ExpertQuantizer
from jaxkit.quant.layer import Quantizer
from jaxkit.quant.model import attach_quantizers


def prepare_ptq(model, trained: QuantConfig, ptq: QuantConfig, seed: int) -> None:
    """Gives a model trained with `trained` quantizers in mode 'ptq' (`ptq`):
    fresh ones for a float model; for a QAT model its own (keeping their
    rotations), which must use the requested formats."""
    if trained.mode == "none":
        attach_quantizers(model, ptq, rngs=nnx.Rngs(seed))
        return
    if dataclasses.replace(trained, mode="ptq") != ptq:
        raise ConfigError(f"the run was trained with model.quant {trained}; quantize it with the "
                          f"same settings (only the mode may change), got {ptq}")
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (Quantizer, ExpertQuantizer)):
            m.cfg = ptq
