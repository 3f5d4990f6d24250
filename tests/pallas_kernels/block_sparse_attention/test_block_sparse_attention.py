"""Block-sparse attention: the reference against dense attention and a
written-out mask, the list transforms, the portable kernels against the
reference (interpreted on CPU, compiled on a GPU), empty rows, dispatch and
the argument checks of the public API."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_sparse_cases import (F32_TOL, Case, compare, inputs, out_and_grads, random_lists,
                                reference_run, relative_error)
from conftest import kernel_modes

from pallas_kernels import compat
from pallas_kernels.attention import attention_reference
from pallas_kernels.block_sparse_attention import api, block_sparse_attention, lists
from pallas_kernels.block_sparse_attention.reference import token_mask
from pallas_kernels.dispatch import Choice

# Odd lengths (partial last blocks), GQA 4/2, both list layouts.
CASES = {
    "causal_q_head_lists": Case(1, 300, 300, 4, 2, 32, 64, 64, list_heads=4, max_blocks=3,
                                causal=True),
    "full_kv_head_lists": Case(2, 300, 300, 4, 2, 32, 64, 64, list_heads=2, max_blocks=4),
    "segments_q_shorter_kv_head_lists": Case(1, 200, 300, 4, 2, 16, 32, 64, list_heads=2,
                                             max_blocks=3, causal=True, segments=True,
                                             softmax_scale=0.3),
    "mqa_q_head_lists_small_blocks": Case(1, 90, 130, 2, 1, 24, 16, 32, list_heads=2,
                                          max_blocks=2, causal=True),
}


# ---------------------------------------------------------------------------
# The reference (the specification).


def test_reference_with_every_block_listed_is_dense_attention():
    case = Case(2, 300, 300, 4, 2, 32, 64, 64, list_heads=2, max_blocks=5, causal=True,
                segments=True)
    q, k, v, _, _, segments = inputs(case, seed=1)
    shape = (case.batch, case.list_heads, case.num_q_blocks)
    every = jnp.broadcast_to(jnp.arange(case.num_kv_blocks, dtype=jnp.int32), shape + (5,))
    got = jax.jit(lambda q, k, v, segments: block_sparse_attention(
        q, k, v, every, jnp.full(shape, 5, jnp.int32), segment_ids=segments,
        implementation="xla", **case.kwargs()))(q, k, v, segments)
    want = jax.jit(lambda q, k, v, segments: attention_reference(
        q, k, v, causal=True, segment_ids=segments))(q, k, v, segments)
    assert relative_error(got, want) < F32_TOL


def test_token_mask_is_the_listed_blocks_written_out():
    case = CASES["segments_q_shorter_kv_head_lists"]
    _, _, _, _, (indices, counts), segments = inputs(case, seed=2)
    got = np.asarray(token_mask(indices, counts, q_len=case.q_len, kv_len=case.kv_len,
                                heads=case.heads, block_q=case.block_q, block_k=case.block_k,
                                causal=True, segment_ids=segments))
    idx, cnt = np.asarray(indices), np.asarray(counts)
    q_ids, kv_ids = (np.asarray(s) for s in segments)
    offset = case.kv_len - case.q_len
    group = case.heads // case.list_heads
    for b, h, s in [(0, 0, 0), (0, 1, 37), (0, 3, 199), (0, 2, 130)]:
        listed = set(idx[b, h // group, s // case.block_q, :cnt[b, h // group, s // case.block_q]])
        want = [(t // case.block_k in listed) and t <= s + offset and q_ids[b, s] == kv_ids[b, t]
                for t in range(case.kv_len)]
        assert got[b, h, s].tolist() == want, (b, h, s)


# ---------------------------------------------------------------------------
# List transforms (pure jnp).


def test_canonical_lists_sort_dedupe_and_drop_out_of_range():
    indices = jnp.asarray([[[[4, 1, 1, 9, -1, 0], [2, 2, 2, 2, 2, 2]]]], jnp.int32)
    counts = jnp.asarray([[[5, 1]]], jnp.int32)  # the 0 of row 0 lies past its count
    got, n = lists.canonical_lists(indices, counts, num_kv_blocks=5)
    assert n.tolist() == [[[2, 1]]]
    assert got.tolist() == [[[[1, 4, 5, 5, 5, 5], [2, 5, 5, 5, 5, 5]]]]


@pytest.mark.parametrize("per", [1, 2])
def test_transposed_lists_invert_the_lists(per):
    """Tiles of ``per`` key blocks: the query blocks listing any block of the
    tile, ascending, with a bit for each block they list (nK = 5 is odd, so
    with per = 2 the last tile holds one block)."""
    case = Case(2, 300, 300, 4, 2, 32, 32, 64, list_heads=4, max_blocks=4)
    indices, counts = random_lists(np.random.default_rng(3), case)
    indices, counts = lists.canonical_lists(indices, counts, case.num_kv_blocks)
    offsets, rows, listed = (np.asarray(x) for x in lists.transposed_lists(
        indices, counts, case.num_kv_blocks, per))
    idx, cnt = np.asarray(indices), np.asarray(counts)
    n_tiles = -(-case.num_kv_blocks // per)
    assert offsets.shape == (2, 4, n_tiles + 1)
    for b, h in np.ndindex(2, 4):
        assert offsets[b, h, 0] == 0
        for j in range(n_tiles):
            want = {}
            for i in range(case.num_q_blocks):
                for w in range(per):
                    if j * per + w in idx[b, h, i, :cnt[b, h, i]]:
                        want[i] = want.get(i, 0) | (1 << w)
            span = slice(offsets[b, h, j], offsets[b, h, j + 1])
            assert rows[b, h, span].tolist() == sorted(want)
            assert listed[b, h, span].tolist() == [want[i] for i in sorted(want)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len", [300, 200])
def test_unmasked_prefix_blocks_are_fully_visible(causal, q_len):
    case = Case(1, q_len, 300, 2, 2, 16, 64, 64, list_heads=2, max_blocks=5, causal=causal)
    indices, counts = random_lists(np.random.default_rng(4), case)
    indices, counts = lists.canonical_lists(indices, counts, case.num_kv_blocks)
    prefix = np.asarray(lists.unmasked_prefix(
        indices, counts, block_q=64, block_k=64, offset=300 - q_len, kv_len=300, causal=causal,
        segments=False))
    every = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (1, 2, case.num_q_blocks, 5))
    mask = np.asarray(token_mask(every, jnp.full((1, 2, case.num_q_blocks), 5, jnp.int32),
                                 q_len=q_len, kv_len=300, heads=2, block_q=64, block_k=64,
                                 causal=causal))
    idx, cnt = np.asarray(indices), np.asarray(counts)
    for h, i in np.ndindex(2, case.num_q_blocks):
        rows = mask[0, h, i * 64:(i + 1) * 64]
        full = [j for j in idx[0, h, i, :cnt[0, h, i]]
                if (j + 1) * 64 <= 300 and rows[:, j * 64:(j + 1) * 64].all()]
        # Real rows only: padded rows sit past q_len and are sliced off.
        assert list(idx[0, h, i, :prefix[0, h, i]]) == full


# ---------------------------------------------------------------------------
# The portable kernels against the reference.


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("name", CASES)
def test_portable_kernel_matches_reference(name, interpret):
    case = CASES[name]
    got = out_and_grads(case, "blockspec", *inputs(case, seed=10), interpret=interpret)
    compare(case, got, reference_run(case, 10))


@pytest.mark.parametrize("interpret", kernel_modes())
def test_rows_without_a_visible_key_are_zero(interpret):
    """Empty lists, and causal rows whose listed blocks all lie in their
    future: output 0 and zero dq, no NaN anywhere."""
    case = Case(1, 100, 100, 2, 1, 16, 32, 32, list_heads=1, max_blocks=2, causal=True)
    q, k, v, cot, _, _ = inputs(case, seed=5)
    # Query block 0 lists nothing; block 1 lists only block 3 (all in its
    # future); blocks 2 and 3 list themselves and block 0.
    indices = jnp.asarray([[[[0, 0], [3, 1], [2, 0], [0, 3]]]], jnp.int32)
    counts = jnp.asarray([[[0, 1, 2, 2]]], jnp.int32)
    got = out_and_grads(case, "blockspec", q, k, v, cot, (indices, counts), None,
                        interpret=interpret)
    compare(case, got, out_and_grads(case, "xla", q, k, v, cot, (indices, counts), None))
    out, dq = got[0], got[1]
    assert bool(jnp.all(out[:, :64] == 0)) and bool(jnp.all(dq[:, :64] == 0))
    assert bool(jnp.all(jnp.any(out[:, 64:] != 0, axis=-1)))


# ---------------------------------------------------------------------------
# Dispatch.


def _tiny(dtype=jnp.float32, D=16, HL=2):
    q = jnp.ones((1, 64, 2, D), dtype)
    k = jnp.ones((1, 64, 1, D), dtype)
    return q, k, k, jnp.zeros((1, HL, 2, 1), jnp.int32), jnp.ones((1, HL, 2), jnp.int32)


def test_auto_is_the_reference_on_cpu_and_pallas_the_portable_kernel():
    args = dict(q=_tiny()[0], k=_tiny()[1], v=_tiny()[1], block_q=32, block_k=32,
                list_heads=2)
    assert api.TABLE.resolve("auto", **args) == Choice("xla", False)
    assert api.TABLE.resolve("pallas", **args) == Choice("blockspec", True)
    with pytest.raises(ValueError, match="'mosaic_gpu' cannot run .* needs bfloat16"):
        api.TABLE.resolve("mosaic_gpu", **args)


def test_pallas_takes_the_hopper_kernel_where_it_runs(monkeypatch):
    monkeypatch.setattr(compat, "platform", lambda: "gpu")
    monkeypatch.setattr(compat, "is_hopper", lambda: True)
    q, k, v, _, _ = _tiny(jnp.bfloat16, D=128)
    args = dict(q=q, k=k, v=v, block_q=64, block_k=64, list_heads=1)
    assert api.TABLE.resolve("pallas", **args) == Choice("mosaic_gpu", False)
    assert api.TABLE.resolve("mosaic_gpu", **args) == Choice("mosaic_gpu", False)
    # Per query head, block_q 64 leaves one consumer without rows.
    with pytest.raises(ValueError, match="multiple of 128 query rows .* = 64"):
        api.TABLE.resolve("mosaic_gpu", **{**args, "list_heads": 2})
    assert api.TABLE.resolve("pallas", **{**args, "list_heads": 2}) == Choice("blockspec", False)


# ---------------------------------------------------------------------------
# Argument checks: one-line errors naming the value, before anything compiles.


def _call(q=None, k=None, v=None, indices=None, counts=None, **kw):
    tq, tk, tv, ti, tc = _tiny()
    kw.setdefault("block_q", 32)
    kw.setdefault("block_k", 32)
    return block_sparse_attention(tq if q is None else q, tk if k is None else k,
                                  tv if v is None else v, ti if indices is None else indices,
                                  tc if counts is None else counts, **kw)


BAD = [
    (dict(q=jnp.ones((1, 64, 3, 16)), k=jnp.ones((1, 64, 2, 16)), v=jnp.ones((1, 64, 2, 16))),
     ValueError, "kv heads (2) must divide q heads (3)"),
    (dict(k=jnp.ones((1, 64, 1, 8)), v=jnp.ones((1, 64, 1, 8))), ValueError, "(1, 64, 1, 8)"),
    (dict(q=jnp.ones((1, 64, 2, 16), jnp.int32)), ValueError, "q, k, v dtypes differ"),
    (dict(block_q=0), ValueError, "block_q must be >= 1, got 0"),
    (dict(block_k=32.0), TypeError, "block_k must be an int, got 32.0"),
    (dict(block_q=16), ValueError, "nQ=4"),
    (dict(indices=jnp.zeros((1, 3, 2, 1), jnp.int32)), ValueError, "H = 2 (query heads) or 1"),
    (dict(indices=jnp.zeros((1, 2, 2), jnp.int32)), ValueError, "got shape (1, 2, 2)"),
    (dict(indices=jnp.zeros((1, 2, 2, 1), jnp.float32)), TypeError,
     "block_indices must have an integer dtype, got float32"),
    (dict(indices=[[[[0]]]]), TypeError, "block_indices must be a jax or NumPy array"),
    (dict(counts=jnp.ones((1, 2, 3), jnp.int32)), ValueError, "block_counts shape (1, 2, 3)"),
    (dict(counts=jnp.full((1, 2, 2), 2, jnp.int32)), ValueError,
     "block_counts must lie in [0, max_blocks=1], got 2"),
    (dict(counts=jnp.full((1, 2, 2), -1, jnp.int32)), ValueError, "got -1"),
    (dict(indices=jnp.full((1, 2, 2, 1), 2, jnp.int32)), ValueError,
     "block_indices must lie in [0, nK=2) where listed, got 2 at (0, 0, 0, 0)"),
    (dict(causal=1), TypeError, "causal must be a bool, got 1"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be finite and > 0, got -1.0"),
    (dict(segment_ids=jnp.zeros((1, 63), jnp.int32)), ValueError, "(1, 63)"),
    (dict(implementation="triton"), ValueError, "unknown block-sparse attention implementation"),
    (dict(implementation="blockspec", block_q=48, block_k=48), ValueError,
     "block_q=48 must be a power of two >= 16"),
    (dict(implementation="xla", interpret=True), ValueError, "takes no interpret"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_arguments_raise_one_line(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)) as raised:
        _call(**kwargs)
    assert "\n" not in str(raised.value)


def test_traced_lists_are_not_checked_but_out_of_range_entries_select_nothing():
    case = CASES["full_kv_head_lists"]
    q, k, v, cot, (indices, counts), _ = inputs(case, seed=6)
    # Each row listed as: its blocks, 99 (beyond nK), its blocks again. The
    # kernels' canonical lists and the reference's mask both drop the extras.
    idx, cnt = np.asarray(indices), np.asarray(counts)
    noisy = np.full(idx.shape[:3] + (2 * idx.shape[3] + 1,), 7, np.int32)
    for pos in np.ndindex(cnt.shape):
        row = list(idx[pos][:cnt[pos]])
        noisy[pos][:2 * cnt[pos] + 1] = row + [99] + row[::-1]
    got = jax.jit(lambda i, c: block_sparse_attention(q, k, v, i, c, implementation="blockspec",
                                                      interpret=True, **case.kwargs()))(
        jnp.asarray(noisy), 2 * counts + 1)
    want = block_sparse_attention(q, k, v, indices, counts, implementation="xla",
                                  **case.kwargs())
    assert relative_error(got, want) < F32_TOL
