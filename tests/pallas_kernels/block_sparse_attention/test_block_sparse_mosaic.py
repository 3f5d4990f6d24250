"""The Hopper (Pallas Mosaic GPU) block-sparse forward, with the portable
backward, against the reference: compiled on an sm_90 GPU (``compiled``,
marked ``gpu``); on CPU lowered for CUDA instead (``lower``), which checks the
kernel's layouts, shared-memory budget and transforms and that a call runs
one Mosaic GPU kernel (the forward) and two Triton ones (dQ, dK/dV). Mosaic
GPU's interpreter cannot run it on CPU (see attention's
test_attention_mosaic.py: transposed wgmma operands)."""
import jax
import jax.numpy as jnp
import pytest
from block_sparse_cases import Case, compare, inputs, out_and_grads, reference_run

from pallas_kernels.block_sparse_attention import mosaic_gpu

BF16, F16 = jnp.bfloat16, jnp.float16
# Both list layouts, block_q 64 and 128, block_k 64 and 128, head_dim 64 and
# 128, causal with q shorter than kv, segment ids, a list row serving 256 rows.
CASES = {
    "q_head_lists_bq128_causal": Case(1, 300, 300, 4, 2, 128, 128, 128, list_heads=4,
                                      max_blocks=2, causal=True, dtype=BF16),
    "kv_head_lists_bq64_full_d64": Case(2, 300, 300, 4, 2, 64, 64, 64, list_heads=2,
                                        max_blocks=3, dtype=F16),
    "kv_head_lists_group4_segments": Case(1, 200, 330, 8, 2, 128, 64, 128, list_heads=2,
                                          max_blocks=3, causal=True, segments=True,
                                          softmax_scale=0.2, dtype=BF16),
}
RUNS = [pytest.param("lower", id="lower"),
        pytest.param("compiled", id="compiled", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("mode", RUNS)
@pytest.mark.parametrize("name", CASES)
def test_hopper_forward_matches_reference(name, mode):
    case = CASES[name]
    args = inputs(case, seed=20)
    if mode == "compiled":
        compare(case, out_and_grads(case, "mosaic_gpu", *args), reference_run(case, 20))
        return
    q, k, v, cot, lists, segments = args
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, cot, *lists)]

    def run(q, k, v, cot, indices, counts):
        def attention(q, k, v):
            return mosaic_gpu.mosaic_block_sparse_attention(q, k, v, indices, counts, segments,
                                                            **case.kwargs())
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(cot))
    text = jax.jit(run).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    assert text.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("dtype, D, block_q, block_k, list_heads, needle", [
    (jnp.float32, 128, 128, 128, 4, "bfloat16 or float16"),
    (BF16, 96, 128, 128, 4, "head_dim"),
    (BF16, 128, 128, 256, 4, "block_k"),
    (BF16, 128, 64, 64, 4, "multiple of 128 query rows"),
    (BF16, 128, 96, 64, 2, "multiple of 64"),
])
def test_supports_names_what_it_cannot_take(dtype, D, block_q, block_k, list_heads, needle):
    q = jnp.ones((1, 256, 4, D), dtype)
    k = jnp.ones((1, 256, 2, D), dtype)
    assert needle in mosaic_gpu.supports(q, k, k, block_q=block_q, block_k=block_k,
                                         list_heads=list_heads)


