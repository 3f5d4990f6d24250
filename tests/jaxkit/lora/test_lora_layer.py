"""LoRA layers on models in memory: a fresh adapter leaves the model's logits
exactly as they were; only adapters are parameters and the gradient step
computes no base-weight gradient; a low-bit base passes gradients to x as its
dequantised weight would; dropout acts in training only; merging (with
low-bit Linear and MoE expert weights dequantised) keeps the forward."""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import LoRAConfig, ModelConfig, QuantConfig
from jaxkit.layers.linear import Linear
from jaxkit.lora import Frozen, LoRALinear, LoRAParam, apply_lora, freeze, merge_lora
from jaxkit.models import Transformer
from jaxkit.quant import QuantWeight, quantize_model
from jaxkit.quant.float_weight import linear_float_kernel

TINY = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=2, mlp_hidden=48,
                   max_seq_len=16, compute_dtype="float32")
LORA = LoRAConfig(base="unused", rank=4, alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 37, (2, 5)), jnp.int32)
FORMATS = {
    "int4": QuantConfig(mode="int", weight_format="int4", granularity="block", block_size=16),
    "int4_asym_hadamard": QuantConfig(mode="int", weight_format="int4_asym", granularity="block",
                                      block_size=16, hadamard=True),
    "w8a8_hadamard": QuantConfig(mode="int", weight_format="int8", activation_format="int8",
                                 hadamard=True),
    "fp8": QuantConfig(mode="int", weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                       granularity="block", block_size=128),
}


def lora_model(cfg=TINY, lora=LORA, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    base_logits = np.asarray(model(TOKENS)[0])
    freeze(model)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    return model, base_logits


def randomize_b(model, seed=2):
    """Non-zero B matrices, so the adapters change the forward."""
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape)


def test_fresh_adapters_leave_the_logits_exactly():
    model, base_logits = lora_model()
    np.testing.assert_array_equal(np.asarray(model(TOKENS)[0]), base_logits)
    randomize_b(model)
    assert np.abs(np.asarray(model(TOKENS)[0]) - base_logits).max() > 1e-2


def test_adapter_computes_the_scaled_low_rank_update():
    model, _ = lora_model(lora=dataclasses.replace(LORA, targets=("q",)))
    randomize_b(model)
    q = model.blocks[0].attn.q
    x = jax.random.normal(jax.random.key(3), (2, 5, 32))
    w = q.base.kernel[...]
    expected = x @ w + (8.0 / 4) * (x @ q.lora_a[...]) @ q.lora_b[...]
    np.testing.assert_allclose(q(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_a_is_drawn_as_init_names_and_b_is_zero(init):
    model, _ = lora_model(lora=dataclasses.replace(LORA, rank=8, init=init))
    layer = model.blocks[0].mlp.down  # in = mlp_hidden = 48
    a = np.asarray(layer.lora_a[...])
    assert a.shape == (48, 8) and not np.asarray(layer.lora_b[...]).any()
    if init == "kaiming":
        assert np.abs(a).max() <= 48 ** -0.5 and np.abs(a).max() > 0.8 * 48 ** -0.5
    else:
        assert 0.08 < a.std() < 0.17  # std 1/rank = 0.125


def test_adapters_go_only_on_the_targets():
    model, _ = lora_model(lora=dataclasses.replace(LORA, targets=("v", "down")))
    wrapped = sorted(path[-2:] for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear))
    assert wrapped == [("attn", "v"), ("attn", "v"), ("mlp", "down"), ("mlp", "down")]
    assert isinstance(model.blocks[0].attn.q, Linear)


def _dot_output_shapes(jaxpr) -> set:
    """Shapes of every dot_general output in a jaxpr and its sub-jaxprs."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes |= _dot_output_shapes(sub)
    return shapes


def _loss_gradient_dots(model) -> tuple[set, set]:
    """(dot_general output shapes of the gradient of the loss with respect to
    the model's nnx.Param, the shapes of its 2-D weights)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r):
        return jnp.mean(nnx.merge(graphdef, p, r)(TOKENS)[0] ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, rest).jaxpr
    weights = {tuple(v.shape) for v in jax.tree.leaves(nnx.state(model)) if v.ndim == 2}
    return _dot_output_shapes(jaxpr), weights


def test_only_adapters_are_parameters_and_no_base_gradient_is_computed():
    model, _ = lora_model()
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert {type(v) for _, v in params} == {LoRAParam}
    assert len(params) == 2 * 7 * TINY.num_layers
    assert {type(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))} == {Frozen}
    dots, weights = _loss_gradient_dots(model)
    base_weights = {s for s in weights if 4 not in s}  # adapters have the rank, 4
    both_ways = base_weights | {s[::-1] for s in base_weights}
    assert not dots & both_ways, dots & both_ways
    # the check sees weight gradients where there are some: the same model trained whole
    full_dots, _ = _loss_gradient_dots(Transformer(TINY, rngs=nnx.Rngs(0)))
    assert full_dots & both_ways


def test_dropout_acts_in_training_only():
    model, _ = lora_model(lora=dataclasses.replace(LORA, dropout=0.5))
    randomize_b(model)
    model.eval()
    plain = np.asarray(model(TOKENS)[0])
    np.testing.assert_array_equal(np.asarray(model(TOKENS)[0]), plain)
    model.train()
    first, second = np.asarray(model(TOKENS)[0]), np.asarray(model(TOKENS)[0])
    assert np.abs(first - plain).max() > 1e-3 and np.abs(second - first).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(TOKENS)[0]), plain)


def _quantized_linear(fmt: str, k=128, n=96, seed=0) -> Linear:
    linear = Linear(k, n, axes=("embed", "mlp"), rngs=nnx.Rngs(seed), compute_dtype=jnp.float32,
                    target="q")
    quantize_model(linear, FORMATS[fmt])
    return linear


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_float_kernel_is_what_the_storage_computes(fmt):
    original = np.asarray(Linear(128, 96, axes=("embed", "mlp"), rngs=nnx.Rngs(0)).kernel[...])
    linear = _quantized_linear(fmt)
    w = np.asarray(linear_float_kernel(linear.quantizer))
    # the weight quantisation error: 4 bits, 8 bits, e4m3
    rel = {"int4": 0.15, "int4_asym_hadamard": 0.15, "w8a8_hadamard": 0.01, "fp8": 0.06}[fmt]
    assert np.linalg.norm(w - original) < rel * np.linalg.norm(original)
    x = jax.random.normal(jax.random.key(1), (3, 128))
    y = np.asarray(linear(x))
    if fmt.startswith("int4"):  # weight-only: x @ W is the forward, up to float rounding
        np.testing.assert_allclose(np.asarray(x @ w), y, rtol=1e-5, atol=1e-5)
    else:  # the forward also quantises x
        assert np.linalg.norm(np.asarray(x @ w) - y) < 0.05 * np.linalg.norm(y)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_low_bit_base_passes_gradients_as_its_dequantised_weight(fmt):
    quantized = _quantized_linear(fmt)
    twin = Linear(128, 96, axes=("embed", "mlp"), rngs=nnx.Rngs(5), compute_dtype=jnp.float32)
    twin.kernel[...] = linear_float_kernel(quantized.quantizer)
    layers = []
    for linear in (quantized, twin):
        freeze(linear)
        layer = LoRALinear(linear, LORA, rngs=nnx.Rngs(1))
        layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
        layers.append(layer)
    x = jax.random.normal(jax.random.key(3), (2, 3, 128))
    cotangent = jax.random.normal(jax.random.key(4), (2, 3, 96))

    def grads(layer):
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
        f = lambda p, x: jnp.sum(cotangent * nnx.merge(graphdef, p, rest)(x))
        return jax.grad(f, argnums=(0, 1))(params, x)

    (dq_params, dq_x), (dt_params, dt_x) = grads(layers[0]), grads(layers[1])
    np.testing.assert_allclose(dq_x, dt_x, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(dq_params), jax.tree.leaves(dt_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(dq_x)).max() > 0.1


def test_merge_keeps_the_forward_and_dequantises_linears_and_experts():
    cfg = dataclasses.replace(
        TINY, num_layers=2, tie_embeddings=False,
        moe=dataclasses.replace(TINY.moe, num_experts=4, top_k=2, expert_hidden=32, first_layer=1,
                                num_shared_experts=1),
        quant=dataclasses.replace(FORMATS["int4_asym_hadamard"],
                                  targets=("q", "k", "v", "o", "mlp", "experts", "head")))
    model = Transformer(dataclasses.replace(cfg, quant=QuantConfig()), rngs=nnx.Rngs(0))
    quantize_model(model, cfg.quant)
    freeze(model)
    apply_lora(model, LORA, rngs=nnx.Rngs(1))
    randomize_b(model)
    unmerged = np.asarray(model(TOKENS)[0])
    merge_lora(model)
    assert not nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))  # no Frozen, QuantWeight
    plain = Transformer(dataclasses.replace(cfg, quant=QuantConfig()), rngs=nnx.Rngs(7))
    merged = nnx.state(model, nnx.Param)
    layout = lambda state: {path: (v.shape, v.dtype) for path, v in nnx.to_flat_state(state)}
    assert layout(merged) == layout(nnx.state(plain, nnx.Param))
    nnx.update(plain, merged)
    # int4 weights only: the dequantised float model computes what the kernels did
    np.testing.assert_allclose(np.asarray(plain(TOKENS)[0]), unmerged, rtol=1e-4, atol=1e-4)


def test_merge_of_a_float_base_keeps_its_dtype():
    model, _ = lora_model(cfg=dataclasses.replace(TINY, param_dtype="bfloat16"))
    randomize_b(model)
    merge_lora(model)
    q = model.blocks[0].attn.q
    assert q.kernel.dtype == jnp.bfloat16 and isinstance(q.kernel, nnx.Param)
    assert not any(isinstance(v, QuantWeight) for _, v in nnx.to_flat_state(nnx.state(model)))


def test_no_projection_among_the_targets_is_an_error():
    cfg = dataclasses.replace(TINY, num_layers=1, moe=dataclasses.replace(
        TINY.moe, num_experts=2, top_k=1, expert_hidden=16))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    freeze(model)
    with pytest.raises(ValueError, match=r"no projection among lora.targets \['gate'\]"):
        apply_lora(model, dataclasses.replace(LORA, targets=("gate",)), rngs=nnx.Rngs(1))
