"""Quantisation inside Linear layers and a tiny transformer: QAT training,
PTQ calibration, conversion to low-bit storage, and the config errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkit.config import ConfigError, ModelConfig, QuantConfig, load_config
from jaxkit.layers import Linear
from jaxkit.models import Transformer, unscan_layers
from jaxkit.quant import (
    QuantWeight,
    attach_quantizers,
    calibrate,
    quantize_model,
    quantizers,
)
from jaxkit.run.build import check_config

TINY = ModelConfig(vocab_size=64, d_model=128, num_layers=2, num_heads=4, mlp_hidden=128,
                   max_seq_len=32, compute_dtype="float32")


def tokens(seed, batch=4, length=24):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY.vocab_size)


def param_paths(model):
    return [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_qat_loss_decreases_with_rotation_and_gradient_quantisation():
    qc = QuantConfig(mode="qat", weight_format="int4", activation_format="mxfp8",
                     gradient_format="fp8_e5m2", granularity=None, hadamard=True)
    model = Transformer(dataclasses.replace(TINY, quant=qc), rngs=nnx.Rngs(0))
    assert len(quantizers(model)) == 14  # q, k, v, o, gate, up, down in two layers
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = tokens(1)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits, _ = m(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(12)]
    assert losses[-1] < losses[0] - 1.0
    # the rotation signs and other quant constants are not trained
    assert not [p for p in param_paths(model) if "signs" in p]


def test_ptq_simulation_matches_the_int8_kernel_path():
    """Simulated (mode ptq) and real (mode int, w8a8 kernel) quantisation of
    the same layers compute the same numbers up to float rounding."""
    qc = QuantConfig(mode="ptq", weight_format="int8", activation_format="int8",
                     smoothquant_alpha=0.5, hadamard=True)
    batch = tokens(2)
    float_model = Transformer(TINY, rngs=nnx.Rngs(0))
    ref, _ = float_model(batch)
    sim = Transformer(TINY, rngs=nnx.Rngs(0))
    assert attach_quantizers(sim, qc, rngs=nnx.Rngs(1)) == 14
    assert calibrate(sim, [tokens(3), tokens(4), tokens(5)]) == 3
    sim_out, _ = sim(batch)
    real = Transformer(TINY, rngs=nnx.Rngs(0))
    attach_quantizers(real, qc, rngs=nnx.Rngs(1))
    calibrate(real, [tokens(3), tokens(4), tokens(5)])
    assert quantize_model(real, dataclasses.replace(qc, mode="int")) == 14
    real_out, _ = real(batch)
    assert rel_err(sim_out, ref) < 0.05
    assert rel_err(real_out, sim_out) < 1e-3
    lin = real.blocks[0].attn.q
    assert lin.kernel is None and lin.quantizer.storage["codes"][...].dtype == jnp.int8
    assert lin.quantizer.storage["codes"][...].shape == (128, 128)


def test_scanned_model_is_unrolled_for_ptq():
    """A model trained with scanned layers refuses per-layer calibration with a
    clear error; unscan_layers unrolls it into an equal model that converts."""
    cfg = dataclasses.replace(TINY, num_layers=4, scan_layers=True)
    scanned = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = tokens(7)
    qc = QuantConfig(mode="int", weight_format="int8", activation_format="int8")
    with pytest.raises(ValueError, match="unscan_layers"):
        quantize_model(scanned, qc)
    with pytest.raises(ValueError, match="unscan_layers"):
        attach_quantizers(scanned, dataclasses.replace(qc, mode="ptq"), rngs=nnx.Rngs(1))
    flat = unscan_layers(scanned)
    assert not flat.cfg.scan_layers and len(flat.blocks) == 4
    ref, _ = scanned(batch)
    out, _ = flat(batch)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert quantize_model(flat, qc) == 28
    assert rel_err(flat(batch)[0], ref) < 0.05


@pytest.mark.parametrize("qc,tol", [
    (QuantConfig(mode="int", weight_format="int4", granularity="block", block_size=32,
                 scale_method="mse"), 0.25),
    (QuantConfig(mode="int", weight_format="int4_asym", granularity="block", block_size=32), 0.25),
    (QuantConfig(mode="int", weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                 granularity="block", block_size=128), 0.15),
])
def test_convert_to_low_bit_storage_gives_close_logits(qc, tol):
    batch = tokens(6)
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    ref, _ = model(batch)
    assert quantize_model(model, qc) == 14
    out, _ = model(batch)
    assert rel_err(out, ref) < tol
    assert nnx.to_flat_state(nnx.state(model, QuantWeight))
    assert not [p for p in param_paths(model) if "kernel" in p]
    with pytest.raises(ValueError, match="already converted"):
        quantize_model(model, qc)


def test_static_activation_scales_come_from_calibration():
    qc = QuantConfig(mode="ptq", activation_format="int8", granularity="tensor")
    lin = Linear(16, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0), compute_dtype=jnp.float32,
                 quant=qc, target="mlp")
    with pytest.raises(ValueError, match="run jaxkit.quant.calibrate first"):
        lin(jnp.ones((2, 16)))
    batches = [jax.random.normal(jax.random.key(i), (3, 16)) * (i + 1) for i in range(3)]
    assert calibrate(lin, batches) == 3
    amax = max(float(jnp.max(jnp.abs(b))) for b in batches)
    assert float(lin.quantizer.act_stat[...]) == pytest.approx(amax)
    x = batches[0]
    y = lin(x)
    scale = amax / 127
    xq = jnp.clip(jnp.round(x * (1 / scale)), -127, 127) * scale
    np.testing.assert_allclose(y, xq @ lin.kernel[...], rtol=1e-5, atol=1e-5)


def test_layers_outside_the_targets_stay_float():
    qc = QuantConfig(mode="qat", weight_format="int8", targets=("mlp",))
    model = Transformer(dataclasses.replace(TINY, quant=qc), rngs=nnx.Rngs(0))
    blk = model.blocks[0]
    assert blk.attn.q.quantizer is None and blk.mlp.up.quantizer is not None


def test_quant_config_errors():
    base = ["model.quant.mode=qat", "model.quant.weight_format=int4"]
    cases = [
        (["model.quant.mode=qat", "model.quant.weight_format=nvfp5"], "did you mean 'nvfp4'"),
        (base + ["model.quant.granularity=block"], "needs a positive block_size"),
        (base + ["model.quant.weight_format=mxfp4", "model.quant.granularity=channel"],
         "fixed 32-element blocks"),
        (base + ["model.quant.smoothquant_alpha=0.5"], "use mode 'ptq' or 'int'"),
        (["model.quant.mode=ptq", "model.quant.weight_format=int8",
          "model.quant.gradient_format=fp8_e5m2"], "only applies to mode 'qat'"),
        (base + ["model.quant.targets=q,kv"], "unknown quant targets"),
        (["model.quant.mode=int", "model.quant.weight_format=mxfp4"], "no kernel for"),
        (["model.quant.mode=int", "model.quant.weight_format=int8",
          "model.quant.activation_format=fp8_e4m3"], "supported: w8a8"),
        (["model.quant.mode=qat"], "needs a weight_format or an activation_format"),
        (base + ["model.quant.targets=q,head"], "needs an untied output head"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_config(load_config(None, overrides))
    head = QuantConfig(mode="ptq", weight_format="int8", targets=("head",))
    with pytest.raises(ValueError, match="untied output head"):
        Transformer(dataclasses.replace(TINY, quant=head), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="untied output head"):
        attach_quantizers(Transformer(TINY, rngs=nnx.Rngs(0)), head, rngs=nnx.Rngs(0))
    untied = Transformer(dataclasses.replace(TINY, tie_embeddings=False), rngs=nnx.Rngs(0))
    assert attach_quantizers(untied, head, rngs=nnx.Rngs(0)) == 1
    with pytest.raises(ValueError, match="unknown Linear target 'mlp_up'"):
        Linear(4, 4, axes=("embed", "mlp"), rngs=nnx.Rngs(0), target="mlp_up")


def test_model_level_errors():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a QuantConfig with mode 'int'"):
        quantize_model(model, QuantConfig(mode="ptq", weight_format="int8"))
    with pytest.raises(ValueError, match="no quantized layers"):
        calibrate(model, [tokens(0)])
    smooth = QuantConfig(mode="int", weight_format="int8", activation_format="int8",
                         smoothquant_alpha=0.5)
    with pytest.raises(ValueError, match="not calibrated"):
        quantize_model(model, smooth)
