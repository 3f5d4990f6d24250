"""Generation through the KV cache equals a full-recompute forward: the
logits of every position after each prompt agree, for a batch of prompts of
different lengths, through the prefill and the decode steps.

Tolerances, against logits of magnitude about 3: float32 caches 1e-5 (the
same math in another order); bfloat16 compute 3e-2; int8 caches 5e-2 and
fp8 caches 0.3 (one rounding of every cached key and value, to 1/254 and
1/16 of its head's largest entry)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from generate_models import VOCAB, caches_for, teacher_forced, tiny_model
from jaxkit.config import QuantConfig
from jaxkit.models import unscan_layers
from jaxkit.quant import attach_quantizers, quantize_model

PROMPT_LENGTHS = [7, 12, 3]
SEQUENCES = np.random.default_rng(0).integers(0, VOCAB, (3, 30))
FLOAT32 = 1e-5
# each cache: (kv_cache, page_size or None for contiguous, slots per sequence, atol)
CONTIGUOUS, PAGED = ("compute", None, 24, FLOAT32), ("compute", 4, 24, FLOAT32)

CASES = {  # name: (model overrides, caches, decode steps, tokens a step[, implementation])
    "dense_three_tokens_a_step": ([], [CONTIGUOUS], 3, 3),
    "gqa_window_softcap_untied_paged": (
        ["model.num_kv_heads=2", "model.attention.sliding_window=5",
         "model.attention.logit_softcap=5.0", "model.tie_embeddings=false"],
        [("compute", 4, 8, FLOAT32)], 6, 1),
    # the window's 5 slots: every prompt but the shortest wraps the ring
    "gqa_window_ring_contiguous": (["model.num_kv_heads=2", "model.attention.sliding_window=5"],
                                   [("compute", None, 5, FLOAT32)], 6, 1),
    "moe_after_a_dense_layer": (["model.num_kv_heads=1", "model.moe.num_experts=4",
                                 "model.moe.top_k=2", "model.moe.expert_hidden=16",
                                 "model.moe.first_layer=1"], [CONTIGUOUS, PAGED], 6, 1),
    "bf16": (["model.compute_dtype=bfloat16", "model.num_kv_heads=2"],
             [("compute", None, 24, 3e-2)], 6, 1),
    "int8_and_fp8_caches": (["model.num_kv_heads=2"],
                            [("int8", None, 24, 5e-2), ("fp8", 4, 24, 0.3)], 6, 1),
    # the portable Pallas kernel (interpreted on a CPU) over a paged ring; its head_dim is
    # >= 16; compiled on a GPU its float32 dots may round as TF32 (1e-2)
    "blockspec_kernel": (["model.d_model=64", "model.num_kv_heads=2",
                          "model.attention.sliding_window=6"], [("compute", 4, 8, 1e-2)], 6, 1,
                         "blockspec"),
}


def _check(model, caches, steps, per_step, implementation="xla"):
    B = len(PROMPT_LENGTHS)
    results, want = teacher_forced(
        model, SEQUENCES, PROMPT_LENGTHS,
        [caches_for(model.cfg, B, slots, kv_cache, page_size)
         for kv_cache, page_size, slots, _ in caches], steps, per_step, implementation)
    assert len(want) == steps * per_step + 1
    for (kv_cache, page_size, _, atol), got in zip(caches, results):
        for i, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0,
                                       err_msg=f"{kv_cache} cache, page size {page_size}: "
                                               f"position {i} after the prompts")


@pytest.mark.parametrize("case", list(CASES))
def test_cache_matches_full_forward(case):
    overrides, *rest = CASES[case]
    _check(tiny_model(*overrides), *rest)


def test_scanned_model_is_unrolled_for_generation():
    scanned = tiny_model("model.scan_layers=true", "model.num_kv_heads=2")
    with pytest.raises(ValueError, match="unscan_layers"):
        scanned.prefill(jnp.zeros((1, 4), jnp.int32), jnp.array([4]),
                        caches_for(scanned.cfg, 1, 8))
    _check(unscan_layers(scanned), [PAGED], 2, 1)


def test_int8_model_decodes_through_its_quantized_kernels():
    """A model converted to int8 weights and activations (jaxkit quantize's
    mode int) runs the same quant_matmul path in prefill, decode and the full
    forward: their logits agree as tightly as a float model's."""
    model = tiny_model("model.num_kv_heads=2")
    int8 = QuantConfig(mode="int", weight_format="int8", activation_format="int8")
    attach_quantizers(model, QuantConfig(mode="ptq", weight_format="int8",
                                         activation_format="int8"), rngs=nnx.Rngs(0))
    assert quantize_model(model, int8) == 7 * model.cfg.num_layers
    _check(model, [("compute", None, 24, 1e-4)], 4, 1)
