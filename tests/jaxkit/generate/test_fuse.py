"""Fused projections (jaxkit.generate.fuse): a model whose q|k|v and gate|up
run as one matmul each gives the unfused model's logits through prefill,
decode steps (contiguous and paged caches) and the full forward, for float
weights and every low-bit 'int' kernel; groups that cannot be fused (LoRA,
N:M sparsity, fake quantisation, per-layer input transforms, fp8 blocks a
part would split) stay as they are; a linear-attention mixer fuses q|k|v
and gate|decay; the Engine
runs the fused model, with three matmuls fewer a layer over the same bytes.

Tolerances, against logits of magnitude about 3: each output column uses
the same weights (low-bit: the same codes and scales), so w8a8 and fp8,
integer or fp8 products of the same activation codes, agree exactly; float
weights and int4 (dequantised, then a float32 dot) 1e-5, as a wider matmul
may sum in another order; bfloat16 compute 3e-2 (as generation's bf16
tests: one rounding difference in a bf16 activation grows through the
layers)."""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from generate_models import VOCAB, caches_for, layer_caches, teacher_forced, tiny_model
from jaxkit.config import LoRAConfig, QuantConfig
from jaxkit.generate import Engine
from jaxkit.generate.engine import cast_weights
from jaxkit.generate.fuse import fuse_projections
from jaxkit.layers import Linear
from jaxkit.layers.linear_attention import LinearAttention
from jaxkit.lora import apply_lora, freeze
from jaxkit.quant import attach_quantizers, quantize_model

PROMPT_LENGTHS = [7, 12, 3]
SEQUENCES = np.random.default_rng(0).integers(0, VOCAB, (3, 30))
EXACT, FLOAT32, BF16 = 0.0, 1e-5, 3e-2
CONTIGUOUS, PAGED = (None, 24), (4, 24)  # (page_size or None, slots per sequence)
GQA = "model.num_kv_heads=2"
FP8_SHAPES = ["model.d_model=128", "model.mlp_hidden=128"]  # K a multiple of its 128 blocks
MOE_SHARED = ["model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.top_k=2",
              "model.moe.expert_hidden=16", "model.moe.first_layer=1",
              "model.moe.num_shared_experts=1"]

W8A8 = QuantConfig(mode="int", weight_format="int8", activation_format="int8")
INT4 = QuantConfig(mode="int", weight_format="int4", granularity="block", block_size=16)
INT4_ASYM = dataclasses.replace(INT4, weight_format="int4_asym")
FP8 = QuantConfig(mode="int", weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                  granularity="block", block_size=128)

CASES = {  # name: (model overrides, quant config or None, fused groups, caches, atol)
    "float_gqa": ([GQA], None, 4, [CONTIGUOUS, PAGED], FLOAT32),
    # the window's 5 slots: every prompt but the shortest wraps the ring
    "float_gqa_window_ring": ([GQA, "model.attention.sliding_window=5"], None, 4,
                              [(None, 5), (4, 8)], FLOAT32),
    # layer 0 dense, layer 1 MoE: its shared expert fuses, its routed experts are one matmul
    "float_moe_shared_expert": (MOE_SHARED, None, 4, [CONTIGUOUS, PAGED], FLOAT32),
    "w8a8": ([GQA], W8A8, 4, [CONTIGUOUS, PAGED], EXACT),
    "w8a8_hadamard_shared_signs": ([GQA], dataclasses.replace(W8A8, hadamard=True), 4,
                                   [CONTIGUOUS], EXACT),
    "int4": ([GQA], INT4, 4, [CONTIGUOUS, PAGED], FLOAT32),
    "int4_asym": ([GQA], INT4_ASYM, 4, [CONTIGUOUS], FLOAT32),
    "int4_moe_shared_expert": (MOE_SHARED, INT4, 4, [PAGED], FLOAT32),
    "int4_bf16": ([GQA, "model.compute_dtype=bfloat16"], INT4, 4, [CONTIGUOUS], BF16),
    # fp8 products sum in float32, in an order that may depend on the matmul's width
    "fp8": (FP8_SHAPES, FP8, 4, [CONTIGUOUS, PAGED], FLOAT32),
    # k and v are 64 wide: a 128-row weight block would hold parts of two of them
    "fp8_gqa_only_gate_up": (FP8_SHAPES + [GQA], FP8, 2, [CONTIGUOUS], FLOAT32),
}


def quantized(model, cfg):
    if cfg is not None:
        quantize_model(model, cfg)
    return model


def fused_copy(model, groups: int):
    fused = nnx.clone(model)
    assert fuse_projections(fused) == groups
    return fused


def assert_same_logits(model, fused, caches, atol, steps=4, make_caches=caches_for):
    """Teacher-forced prefill and decode steps through each cache layout,
    and the full forward: fused equals unfused."""
    B = len(PROMPT_LENGTHS)
    runs = [teacher_forced(m, SEQUENCES, PROMPT_LENGTHS,
                           [make_caches(m.cfg, B, slots, page_size=page_size)
                            for page_size, slots in caches], steps)
            for m in (fused, model)]
    (got_cached, got_full), (want_cached, want_full) = runs
    for (page_size, _), got, want in zip(caches, got_cached, want_cached):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0,
                                       err_msg=f"page size {page_size}: position {i}")
    for i, (g, w) in enumerate(zip(got_full, want_full, strict=True)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0,
                                   err_msg=f"full forward: position {i}")


@pytest.mark.parametrize("case", list(CASES))
def test_fused_model_gives_the_same_logits(case):
    overrides, quant, groups, caches, atol = CASES[case]
    model = quantized(tiny_model(*overrides), quant)
    assert_same_logits(model, fused_copy(model, groups), caches, atol)


def _projection_names(model) -> set:
    return {path[-1] for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def test_fused_layers_hold_one_linear_and_no_parts():
    fused = fused_copy(tiny_model(GQA), 4)
    assert _projection_names(fused) == {"qkv", "gate_up", "o", "down"}
    attn = fused.blocks[0].attn
    assert attn.q is None and attn.k is None and attn.v is None
    assert attn.qkv.kernel.shape == (32, 4 * 8 + 2 * 2 * 8)
    assert fused.blocks[0].mlp.gate_up.kernel.shape == (32, 2 * 48)
    assert fuse_projections(fused) == 0  # fused already


def test_lora_adapted_projections_stay_unfused():
    model = tiny_model(GQA)
    freeze(model)
    apply_lora(model, LoRAConfig(rank=2, targets=("k",)), rngs=nnx.Rngs(1))
    fused = fused_copy(model, 2)  # each layer's gate|up only
    assert "qkv" not in _projection_names(fused)
    assert_same_logits(model, fused, [CONTIGUOUS], FLOAT32, steps=2)


def test_nm_sparse_projections_stay_unfused():
    model = tiny_model(GQA, "model.sparsity.enabled=true", "model.sparsity.targets=[q]")
    fused = fused_copy(model, 2)
    assert _projection_names(fused) == {"q", "k", "v", "o", "gate_up", "down"}
    assert_same_logits(model, fused, [CONTIGUOUS], FLOAT32, steps=2)


@pytest.mark.parametrize("mode", ["qat", "ptq"])
def test_fake_quantised_projections_stay_unfused(mode):
    """Each projection fake-quantises its own weight (per-tensor scales
    would change if concatenated)."""
    model = tiny_model(GQA, f"model.quant.mode={mode}", "model.quant.weight_format=int8",
                       "model.quant.granularity=tensor")
    fused = fused_copy(model, 0)
    assert _projection_names(fused) == _projection_names(model)


def test_low_bit_parts_with_their_own_input_transform_stay_unfused():
    """Hadamard signs drawn per layer: q, k and v rotate x differently."""
    model = tiny_model(GQA)
    hadamard = dataclasses.replace(W8A8, hadamard=True)
    attach_quantizers(model, dataclasses.replace(hadamard, mode="ptq"), rngs=nnx.Rngs(0))
    quantize_model(model, hadamard)
    fused_copy(model, 0)


def test_mixed_float_and_low_bit_parts_stay_unfused():
    model = quantized(tiny_model(GQA), dataclasses.replace(INT4, targets=("q",)))
    fused = fused_copy(model, 2)  # the float gate|up fuse
    assert _projection_names(fused) == {"q", "k", "v", "o", "gate_up", "down"}
    assert_same_logits(model, fused, [CONTIGUOUS], FLOAT32, steps=2)


def test_linear_attention_mixer_fuses_qkv_and_gate_decay():
    """Layer 0 linear attention (q|k|v, gate|decay and its MLP's gate|up
    fuse), layer 1 softmax attention (q|k|v and gate|up): the same logits
    through the recurrent-state and KV caches and the full forward."""
    model = tiny_model("model.mixer=linear", "model.softmax_every=2")
    fused = fused_copy(model, 5)
    mixer = fused.blocks[0].attn
    assert isinstance(mixer, LinearAttention)
    assert all(getattr(mixer, n) is None for n in ("q", "k", "v", "gate", "decay"))
    assert mixer.qkv.kernel.shape == (32, 3 * 32)
    assert mixer.gate_decay.kernel.shape == (32, 32 + 4)  # the gate, one decay a head
    assert fuse_projections(fused) == 0
    assert_same_logits(model, fused, [CONTIGUOUS, PAGED], FLOAT32, make_caches=layer_caches)


def _count_dots(jaxpr) -> int:
    """dot_general equations, sub-jaxprs (jit, custom_vjp) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _count_dots(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _count_dots(sub)
    return count


def _decode_dots(model) -> int:
    caches = caches_for(model.cfg, 1, 8)
    step = lambda m, t: m.decode(t, jnp.array([1]), caches, implementation="xla")[0]
    return _count_dots(jax.make_jaxpr(lambda t: step(model, t))(jnp.zeros((1, 1), jnp.int32)).jaxpr)


@pytest.mark.parametrize("quant", [None, INT4, W8A8], ids=["float", "int4", "w8a8"])
def test_engine_runs_fused_projections_over_the_same_bytes(quant):
    model = quantized(tiny_model(GQA), quant)
    engine = Engine(model, implementation="xla")
    fused = nnx.merge(engine.graphdef, engine.state)
    layers = model.cfg.num_layers
    linears = lambda m: sum(isinstance(x, Linear) for _, x in nnx.iter_modules(m))
    assert (linears(model), linears(fused)) == (7 * layers, 4 * layers)
    assert _decode_dots(model) - _decode_dots(fused) == 3 * layers
    unfused = nnx.clone(model)
    cast_weights(unfused)
    nbytes = lambda state: sum(x.nbytes for x in jax.tree.leaves(state))
    assert nbytes(engine.state) == nbytes(nnx.state(unfused))
