"""QLoRA: adapters trained on the int8 (w8a8, Hadamard-rotated) and int4
(weight-only, groups of 16) models `jaxkit quantize --out` writes. The run
starts at the quantised model's logits, fits a batch, keeps its base in
low-bit storage bitwise as written, and exports dequantised merged weights."""
import dataclasses

import numpy as np
import pytest
from flax import nnx
from lora_runs import (QUANT, config, fit, flat_values, logits, lora_config, model_state_of,
                       train_losses)

from jaxkit.config import QuantConfig
from jaxkit.quant import QuantWeight
from jaxkit.run.export import export_run
from jaxkit.run.load import load_model
from jaxkit.run.lora import build_lora_model, load_base, load_lora_run
from jaxkit.run.quantize import quantize_run

STEPS = 8


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The directory holding a 3-step base run and its int8 and int4 models."""
    tmp = tmp_path_factory.mktemp("qlora")
    fit(config("train.steps=3"), tmp / "base")
    for fmt, overrides in QUANT.items():
        quantize_run(config(*overrides), tmp / "base", out=tmp / fmt)
    return tmp


def qlora_config(tmp, fmt, *overrides):
    return lora_config(tmp / fmt, *QUANT[fmt], f"train.steps={STEPS}", *overrides)


@pytest.mark.parametrize("fmt", list(QUANT))
def test_qlora_trains_and_its_base_stays_low_bit(quantized, fmt, tmp_path):
    cfg = qlora_config(quantized, fmt)
    base = load_base(cfg)
    np.testing.assert_array_equal(logits(build_lora_model(cfg)), logits(base))
    trainer = fit(cfg, tmp_path / "run", one_batch=True)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.7 * losses[0], losses
    stored = model_state_of(trainer, QuantWeight)
    written = flat_values(nnx.state(base, QuantWeight))
    # every projection's codes and scales, under its LoRALinear's "base"
    assert len(stored) == len(written) >= 2 * 7 * 2
    assert {tuple(k for k in path if k != "base") for path in stored} == written.keys()
    codes = np.int8 if fmt == "int8" else np.uint8
    assert {v.dtype for path, v in stored.items() if path[-1] == "codes"} == {np.dtype(codes)}
    for path, value in stored.items():
        np.testing.assert_array_equal(value, written[tuple(k for k in path if k != "base")])
    assert not [p for p in model_state_of(trainer) if p[-1] == "kernel"]  # no float kernels


@pytest.mark.parametrize("fmt", list(QUANT))
def test_export_dequantises_and_merges(quantized, fmt, tmp_path):
    cfg = qlora_config(quantized, fmt, "checkpoint.every=0")
    fit(cfg, tmp_path / "run", one_batch=True)
    export_run(cfg, tmp_path / "run", tmp_path / "merged")
    unmerged = logits(load_lora_run(cfg, tmp_path / "run")[0])
    float_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant=QuantConfig()))
    merged = logits(load_model(float_cfg, params=tmp_path / "merged"))
    if fmt == "int4":  # weight-only: the dequantised model computes what the kernel did
        np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    else:  # the merged model no longer rounds activations to int8
        assert np.abs(merged - unmerged).max() < 0.05 * np.abs(unmerged).max()
