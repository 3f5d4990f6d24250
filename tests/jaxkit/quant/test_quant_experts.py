"""Quantisation of MoE experts (quant target 'experts'): the layer against a
direct computation of the quantised SwiGLU, QAT training, conversion to
low-bit storage against the simulated path, and the errors. (Expert
parallelism with quantised experts is one of tests/jaxkit/layers/moe/test_moe.py's EP cases.)"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkit.config import ModelConfig, MoEConfig, QuantConfig
from jaxkit.layers.moe import MoE
from jaxkit.models import Transformer
from jaxkit.quant import (
    ExpertQuantizer,
    QuantWeight,
    attach_quantizers,
    fake_quant,
    quantize_model,
    rotate_activation,
    rotate_weight,
)
from jaxkit.sharding import activate, resolve_rules


def moe_cfg(quant=QuantConfig(), **moe):
    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 32, **moe}
    return ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, mlp_hidden=64,
                       max_seq_len=32, compute_dtype="float32", moe=MoEConfig(**moe), quant=quant)


def forward(layer, x):
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("qc", [
    QuantConfig(mode="qat", weight_format="int4", activation_format="int8", hadamard=True),
    QuantConfig(mode="ptq", weight_format="mxfp4", activation_format="mxfp8"),
    QuantConfig(mode="qat", weight_format="nvfp4", hadamard=True),
])
def test_one_expert_layer_equals_the_quantised_swiglu(qc):
    """With one expert and top-1 routing every token goes to expert 0 with
    weight 1, so the layer must equal the quantised SwiGLU written out."""
    cfg = moe_cfg(qc, num_experts=1, top_k=1)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 64))
    y, _ = forward(layer, x)

    q = layer.quantizer.quant()
    kw = {"granularity": qc.granularity, "block_size": qc.block_size}

    def wq(w, signs):
        w = w[0] if signs is None else rotate_weight(w[0], signs)
        return fake_quant(w, qc.weight_format, axis=0, **kw)

    def aq(a, signs):
        a = a if signs is None else rotate_activation(a, signs)
        return a if qc.activation_format is None else \
            fake_quant(a, qc.activation_format, axis=-1, **kw)

    xi = aq(x, q.signs_in)
    h = jax.nn.silu(xi @ wq(layer.gate[...], q.signs_in)) * (xi @ wq(layer.up[...], q.signs_in))
    ref = aq(h, q.signs_hidden) @ wq(layer.down[...], q.signs_hidden)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    # and the quantisation is really there: the float layer differs
    float_layer = MoE(moe_cfg(num_experts=1, top_k=1), rngs=nnx.Rngs(0))
    assert rel_err(forward(float_layer, x)[0], y) > 1e-3


def test_qat_moe_transformer_trains_and_grads_reach_experts():
    qc = QuantConfig(mode="qat", weight_format="int4", activation_format="fp8_e4m3",
                     gradient_format="fp8_e5m2", hadamard=True, targets=("experts",))
    model = Transformer(moe_cfg(qc, num_shared_experts=1), rngs=nnx.Rngs(0))
    moe = model.blocks[0].mlp
    assert isinstance(moe.quantizer, ExpertQuantizer)
    assert moe.shared.up.quantizer is not None  # shared experts are target 'experts' too
    assert model.blocks[0].attn.q.quantizer is None
    batch = jax.random.randint(jax.random.key(2), (4, 24), 0, 64)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits, aux = m(batch[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            return ce + aux["moe_loss"]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    loss0, grads = step(model, opt)
    g = grads.blocks[0].mlp
    for name in ("gate", "up", "down"):
        assert float(jnp.abs(g[name][...]).max()) > 0, name
    losses = [float(step(model, opt)[0]) for _ in range(10)]
    assert losses[-1] < float(loss0) - 0.5


@pytest.mark.parametrize("qc,dtype", [
    (QuantConfig(mode="ptq", weight_format="int8", activation_format="int8", hadamard=True),
     jnp.int8),
    (QuantConfig(mode="ptq", weight_format="int4_asym", granularity="block", block_size=16),
     jnp.uint8),
    (QuantConfig(mode="ptq", weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                 granularity="block", block_size=128), jnp.float8_e4m3fn),
])
def test_converted_experts_equal_the_simulation(qc, dtype):
    """Mode 'int' stores real low-bit codes and reproduces mode 'ptq'."""
    cfg = dataclasses.replace(moe_cfg(expert_hidden=128), d_model=128)
    x = jax.random.normal(jax.random.key(3), (2, 8, 128))
    sim = MoE(cfg, rngs=nnx.Rngs(0))
    real = MoE(cfg, rngs=nnx.Rngs(0))
    assert attach_quantizers(sim, qc, rngs=nnx.Rngs(1)) == 1
    attach_quantizers(real, qc, rngs=nnx.Rngs(1))
    assert quantize_model(real, dataclasses.replace(qc, mode="int")) == 1
    assert real.gate is None and real.up is None and real.down is None
    ref, out = forward(sim, x)[0], forward(real, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    codes = real.quantizer.storage["gate"]["codes"][...]
    assert codes.dtype == dtype
    full = 4 * 128 * 128  # E * D * H elements
    assert codes.size == (full // 2 if dtype == jnp.uint8 else full)
    assert nnx.to_flat_state(nnx.state(real, QuantWeight))
    with pytest.raises(ValueError, match="already converted"):
        quantize_model(real, dataclasses.replace(qc, mode="int"))


def test_expert_quant_errors():
    sq = QuantConfig(mode="ptq", weight_format="int8", activation_format="int8",
                     smoothquant_alpha=0.5)
    with pytest.raises(ValueError, match="remove 'experts'"):
        MoE(moe_cfg(sq), rngs=nnx.Rngs(0))
    static = QuantConfig(mode="ptq", weight_format="int8", activation_format="int8",
                         granularity="tensor")
    with pytest.raises(ValueError, match="static per-tensor"):
        attach_quantizers(MoE(moe_cfg(), rngs=nnx.Rngs(0)), static, rngs=nnx.Rngs(0))
    # the same configs are fine when experts are not a target
    MoE(moe_cfg(dataclasses.replace(sq, targets=("q", "k"))), rngs=nnx.Rngs(0))


def _pallas_operand_dtypes(jaxpr):
    """Operand dtypes of every pallas_call in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append({str(v.aval.dtype) for v in eqn.invars})
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _pallas_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("qc,code_dtype", [
    (QuantConfig(mode="ptq", weight_format="int8", activation_format="int8", hadamard=True),
     "int8"),
    (QuantConfig(mode="ptq", weight_format="int4_asym", granularity="block", block_size=32),
     "uint8"),
    (QuantConfig(mode="ptq", weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                 granularity="block", block_size=128), "float8_e4m3fn"),
])
def test_int_experts_run_the_quantised_grouped_kernel(qc, code_dtype):
    """Mode 'int' with gmm_implementation 'pallas' multiplies the stored codes
    with the qgmm kernel (interpreted here: its pallas_call takes the codes)
    and equals mode 'ptq' (fake-quantised float weights, the XLA grouped
    matmul) within rtol 1e-4 / atol 1e-5: the kernel scales per-group
    partial sums instead of dequantised weights, a float32 rounding change."""
    cfg = dataclasses.replace(moe_cfg(expert_hidden=128), d_model=128)
    cfg_kernel = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe,
                                                                  gmm_implementation="pallas"))
    x = jax.random.normal(jax.random.key(4), (2, 8, 128))
    sim = MoE(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gmm_implementation="xla")),
              rngs=nnx.Rngs(0))
    real = MoE(cfg_kernel, rngs=nnx.Rngs(0))
    attach_quantizers(sim, qc, rngs=nnx.Rngs(1))
    attach_quantizers(real, qc, rngs=nnx.Rngs(1))
    quantize_model(real, dataclasses.replace(qc, mode="int"))
    graphdef, state = nnx.split(real)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
    calls = _pallas_operand_dtypes(jaxpr)
    assert len(calls) == 3 and all(code_dtype in dtypes for dtypes in calls), calls
    np.testing.assert_allclose(forward(real, x)[0], forward(sim, x)[0], rtol=1e-4, atol=1e-5)


def test_int_experts_expert_parallel_equal_single_device():
    """Mode 'int' storage (int4 codes, scales) shards along the expert axis and
    the qgmm kernel runs inside shard_map: 4 fake CPU devices (data 2 x
    expert 2, explicit and auto axes) give the single-device output within
    1e-5."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parents[3]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("ok ") == 2, proc.stdout


def _expert_parallel_int(explicit: bool):
    P = jax.sharding.PartitionSpec
    qc = QuantConfig(mode="ptq", weight_format="int4", granularity="block", block_size=32)
    cfg = dataclasses.replace(moe_cfg(expert_hidden=64, gmm_implementation="pallas"), d_model=64)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    attach_quantizers(layer, qc, rngs=nnx.Rngs(1))
    quantize_model(layer, dataclasses.replace(qc, mode="int"))
    graphdef, state = nnx.split(layer)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    x = jax.random.normal(jax.random.key(1), (4, 8, 64))
    y1 = f(state, x)
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "expert"), axis_types=(kind, kind))
    with activate(mesh, resolve_rules()):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
        calls = _pallas_operand_dtypes(jax.make_jaxpr(f)(state, xs).jaxpr)
        assert "all_to_all" in str(jax.make_jaxpr(f)(state, xs))
        assert len(calls) == 3 and all("uint8" in d for d in calls), calls
        y2 = f(state, xs)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":  # the expert-parallel check, run with 4 fake CPU devices
    assert jax.device_count() == 4, jax.devices()
    with jax.default_matmul_precision("highest"):
        for explicit in (True, False):
            _expert_parallel_int(explicit)
            print("ok", explicit, flush=True)
