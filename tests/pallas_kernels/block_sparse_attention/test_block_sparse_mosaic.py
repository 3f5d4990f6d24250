"""The Hopper (Pallas Mosaic GPU) block-sparse forward, with the Hopper
backward or the portable one, against the reference: compiled on an sm_90
GPU (``compiled``, marked ``gpu``; out, dq, dk, dv in float32-accumulated
16-bit against the float32 reference, relative error under
LOW_PRECISION_TOL); on CPU lowered for CUDA instead (``lower``), which checks
the kernels' layouts, shared-memory budget and transforms and that a call
runs the Mosaic GPU forward and either the fused Hopper backward (one more
Mosaic GPU kernel) or two Triton ones (dQ, dK/dV). Mosaic GPU's interpreter
cannot run them on CPU (see attention's test_attention_mosaic.py: transposed
wgmma operands). The backward's lists (transposed, masked-step counts) are
checked on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_sparse_cases import Case, compare, inputs, reference_run

from pallas_kernels import compat
from pallas_kernels.attention.mask import visible
from pallas_kernels.block_sparse_attention import block_sparse_attention, lists, mosaic_gpu
from pallas_kernels.block_sparse_attention.blockspec import prepare
from pallas_kernels.block_sparse_attention.mosaic_gpu_backward import _masked_steps

BF16, F16 = jnp.bfloat16, jnp.float16
# Both list layouts, block_q 64 and 128, block_k 64 and 128 (two key blocks a
# backward tile) at head_dim 64 and 128, causal with q shorter than kv,
# segment ids, a list row serving 256 rows; S = 300 leaves partial blocks.
CASES = {
    "q_head_lists_bq128_causal": Case(1, 300, 300, 4, 2, 128, 128, 128, list_heads=4,
                                      max_blocks=2, causal=True, dtype=BF16),
    "kv_head_lists_bq64_full_d64": Case(2, 300, 300, 4, 2, 64, 64, 64, list_heads=2,
                                        max_blocks=3, dtype=F16),
    "kv_head_lists_group4_segments": Case(1, 200, 330, 8, 2, 128, 64, 128, list_heads=2,
                                          max_blocks=3, causal=True, segments=True,
                                          softmax_scale=0.2, dtype=BF16),
    "q_head_lists_bk64_d128_segments": Case(1, 300, 300, 4, 2, 128, 128, 64, list_heads=4,
                                            max_blocks=3, causal=True, segments=True,
                                            dtype=BF16),
}
RUNS = [pytest.param("lower", id="lower"),
        pytest.param("compiled", id="compiled", marks=pytest.mark.gpu)]
BACKWARDS = {"hopper": True, "portable": False}


def _mosaic_run(case, hopper_backward, segments):
    """run(q, k, v, cot, indices, counts) -> out, dq, dk, dv of the Hopper
    forward and the chosen backward."""
    def run(q, k, v, cot, indices, counts):
        indices, counts = lists.canonical_lists(indices, counts, case.num_kv_blocks)

        def attention(q, k, v):
            return mosaic_gpu.mosaic_block_sparse_attention(
                q, k, v, indices, counts, segments, hopper_backward=hopper_backward,
                **case.kwargs())
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(cot))
    return run


def _kernel_counts(text):
    return text.count("custom_call @mosaic_gpu"), text.count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("mode", RUNS)
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("name", CASES)
def test_hopper_kernels_match_reference(name, backward, mode):
    case = CASES[name]
    q, k, v, cot, lists_, segments = inputs(case, seed=20)
    run = _mosaic_run(case, BACKWARDS[backward], segments)
    if mode == "compiled":
        compare(case, jax.jit(run)(q, k, v, cot, *lists_), reference_run(case, 20))
        return
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, cot, *lists_)]
    text = jax.jit(run).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert _kernel_counts(text) == ((2, 0) if BACKWARDS[backward] else (1, 2))


@pytest.mark.gpu
def test_hopper_backward_rows_without_a_visible_key_are_zero():
    """Empty lists and causal rows whose listed blocks lie in their future:
    output 0 and zero dq, no NaN; key blocks no query block lists get zero
    dk and dv."""
    case = Case(1, 256, 256, 2, 1, 64, 64, 64, list_heads=1, max_blocks=2, causal=True,
                dtype=BF16)
    q, k, v, cot, _, _ = inputs(case, seed=5)
    # Query block 0 lists nothing; block 1 lists only block 3 (all in its
    # future); blocks 2 and 3 list themselves and block 0. Block 1 is unlisted.
    indices = jnp.asarray([[[[0, 0], [3, 1], [2, 0], [0, 3]]]], jnp.int32)
    counts = jnp.asarray([[[0, 1, 2, 2]]], jnp.int32)
    got = jax.jit(_mosaic_run(case, True, None))(q, k, v, cot, indices, counts)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, cot)]
    want = jax.jit(_reference_run(case))(*f32, indices, counts)
    compare(case, got, [x.astype(case.dtype) for x in want])
    out, dq, dk, dv = got
    assert bool(jnp.all(out[:, :128] == 0)) and bool(jnp.all(dq[:, :128] == 0))
    assert bool(jnp.all(dk[:, 64:128] == 0)) and bool(jnp.all(dv[:, 64:128] == 0))


def _reference_run(case):
    def run(q, k, v, cot, indices, counts):
        out, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(
            q, k, v, indices, counts, implementation="xla", **case.kwargs()), q, k, v)
        return (out, *vjp(cot))
    return run


@pytest.mark.parametrize("implementation, verified, kernels", [
    ("mosaic_gpu", False, (2, 0)), ("pallas", False, (1, 2)), ("pallas", True, (2, 0))])
def test_pallas_takes_the_hopper_backward_once_verified(monkeypatch, implementation, verified,
                                                        kernels):
    monkeypatch.setattr(compat, "platform", lambda: "gpu")
    monkeypatch.setattr(compat, "is_hopper", lambda: True)
    monkeypatch.setattr(mosaic_gpu, "BACKWARD_VERIFIED", verified)
    case = CASES["kv_head_lists_bq64_full_d64"]
    q, k, v, cot, lists_, _ = inputs(case, seed=21)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, cot, *lists_)]

    def run(q, k, v, cot, indices, counts):
        out, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(
            q, k, v, indices, counts, implementation=implementation, **case.kwargs()), q, k, v)
        return (out, *vjp(cot))
    text = jax.jit(run).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert _kernel_counts(text) == kernels


@pytest.mark.parametrize("name", ["q_head_lists_bq128_causal", "kv_head_lists_group4_segments",
                                  "q_head_lists_bk64_d128_segments"])
@pytest.mark.parametrize("segments", [False, True])
def test_masked_steps_leave_only_fully_visible_tiles_unmasked(name, segments):
    """Per backward tile (128 keys) and list row, the steps past the masked
    count see every key of the tile (so the kernel may skip the mask), and
    without segment ids the last masked one does not (the count is tight)."""
    case = CASES[name]
    _, _, _, _, (indices, counts), _ = inputs(case, seed=22)
    indices, counts = lists.canonical_lists(indices, counts, case.num_kv_blocks)
    q = jnp.zeros((case.batch, case.q_len, case.heads, case.head_dim), case.dtype)
    k = jnp.zeros((case.batch, case.kv_len, case.kv_heads, case.head_dim), case.dtype)
    ids = (jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32))
    _, k_p, _, _, cfg = prepare(q, k, k, ids if segments else None, block_q=case.block_q,
                                block_k=case.block_k, causal=case.causal, softmax_scale=None,
                                list_heads=case.list_heads, interpret=False)
    per, sub = 128 // case.block_k, case.block_q // 64
    offsets, rows, _ = lists.transposed_lists(indices, counts, case.num_kv_blocks, per)
    masked = np.asarray(_masked_steps(offsets, rows, cfg, sub))
    offsets, rows = np.asarray(offsets), np.asarray(rows)
    # Which (query row, key) pairs of the padded problem the mask lets through.
    q_pos = np.arange(q.shape[1] + case.block_q) + (case.kv_len - case.q_len)
    k_pos = np.arange(-(-k_p.shape[1] // 128) * 128)
    seen = np.asarray(visible(q_pos[:, None], k_pos[None, :], causal=case.causal,
                              sliding_window=None)) & (k_pos < case.kv_len)
    for b, h, j in np.ndindex(*masked.shape):
        tiles = [i * sub + s for i in rows[b, h, offsets[b, h, j]:offsets[b, h, j + 1]]
                 for s in range(sub)]
        full = [bool(seen[t * 64:(t + 1) * 64, j * 128:(j + 1) * 128].all()) for t in tiles]
        m = masked[b, h, j]
        assert all(full[m:]), (b, h, j)
        if segments:
            assert m == len(tiles)
        elif m:
            assert not full[m - 1], (b, h, j)


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


