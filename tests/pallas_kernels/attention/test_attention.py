"""The reference (implementation='xla') and the portable Pallas
flash-attention kernel on the shared case table (attention_cases.py), the
kernel interpreted on CPU and compiled on a GPU; the kernel's logsumexp and
fully masked rows; the argument checks of the public API.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (CASES, F32_TOL, Case, check, compare, expected, inputs, out_and_grads,
                             problem, relative_error, segment_ids)
from case_table import case_params, refusals
from conftest import kernel_modes

from pallas_kernels.attention import attention_reference_with_lse, flash_attention
from pallas_kernels.attention.blockspec import PortableBlockSizes, blockspec_attention_with_lse


# (implementation, mode): the reference runs on the default device, the
# portable kernel interpreted on CPU and compiled on a GPU.
RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("blockspec", "interpret", id="blockspec-interpret"),
        pytest.param("blockspec", "compiled", id="blockspec-compiled", marks=pytest.mark.gpu)]


def test_case_table_coverage():
    """The reference and the portable kernel take every case but the GPU-only
    one, which the portable kernel runs compiled only."""
    assert set(refusals(CASES, RUNS, problem)) == {
        (name, run.id) for name, case in CASES.items() for run in RUNS
        if case.compiled_only and run.id != "blockspec-compiled"}


@pytest.mark.parametrize("name,implementation,mode", case_params(CASES, RUNS, problem))
def test_implementation_matches_reference(name, implementation, mode):
    case = CASES[name]
    kernel = {} if implementation == "xla" else dict(block_sizes=case.portable_blocks,
                                                     interpret=mode == "interpret")

    def attention(q, k, v, segments):
        return flash_attention(q, k, v, segment_ids=segments, implementation=implementation,
                               **kernel, **case.attention_kwargs())
    check(name, attention)


@pytest.mark.parametrize("interpret", kernel_modes())
def test_fully_masked_rows_are_zero_without_nan(interpret):
    case = Case(2, 45, 60, 2, 1, 32, segments=2)
    q, k, v, (_, kv_seg), cotangent = inputs(case, seed=11)
    # Ids 5 and 6 appear nowhere in kv_seg: those query rows see no key at all.
    empty = jnp.arange(case.q_len) % 4 == 0
    q_seg = jnp.where(empty, 5 + jnp.arange(case.batch)[:, None],
                      segment_ids(np.random.default_rng(13), case.batch, case.q_len, 2))

    def attention(q, k, v, segments):
        return flash_attention(q, k, v, segment_ids=segments, implementation="blockspec",
                               block_sizes=case.portable_blocks, interpret=interpret)
    segments = (q_seg, kv_seg)
    out, dq, dk, dv = jax.jit(functools.partial(out_and_grads, attention))(
        q, k, v, segments, cotangent)
    compare(case, (out, dq, dk, dv), expected(case, q, k, v, segments, cotangent))
    assert bool(jnp.all(out[:, empty] == 0)) and bool(jnp.all(dq[:, empty] == 0))
    assert bool(jnp.any(out[:, ~empty] != 0))


@pytest.mark.parametrize("interpret", kernel_modes())
def test_logsumexp_matches_reference(interpret):
    case = CASES["q_longer_than_kv"]  # includes rows with no visible key (lse = -inf)
    q, k, v, _, _ = inputs(case, seed=21)
    out, lse = blockspec_attention_with_lse(q, k, v, causal=True,
                                            block_sizes=case.portable_blocks,
                                            interpret=interpret)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, causal=True)
    assert relative_error(out, ref_out) < F32_TOL
    assert bool(jnp.all(jnp.isneginf(lse) == jnp.isneginf(ref_lse)))
    finite = jnp.isfinite(ref_lse)
    assert bool(jnp.any(~finite)) and bool(jnp.any(finite))
    assert float(jnp.max(jnp.abs(jnp.where(finite, lse - ref_lse, 0.0)))) < 1e-5


def _qkv(shape_q=(1, 8, 4, 16), shape_kv=(1, 8, 2, 16)):
    """Inputs for argument checks (numpy's generator: nothing to compile)."""
    rng = np.random.default_rng(3)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in (shape_q, shape_kv, shape_kv))


@pytest.mark.parametrize("shapes, match", [
    (((1, 8, 4), (1, 8, 2, 16)), r"\(1, 8, 4\)"),
    (((1, 8, 4, 16), (1, 8, 2, 32)), r"\(1, 8, 2, 32\)"),
    (((2, 8, 4, 16), (1, 8, 2, 16)), r"\(2, 8, 4, 16\)"),
    (((1, 8, 4, 16), (1, 8, 3, 16)), "kv heads \\(3\\)"),
])
def test_bad_shapes_raise(shapes, match):
    q, k, v = _qkv(*shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, implementation="pallas")


def test_bad_dtype_raises():
    q, k, v = (x.astype(jnp.int32) for x in _qkv())
    with pytest.raises(ValueError, match="int32"):
        flash_attention(q, k, v, implementation="pallas")


@pytest.mark.parametrize("window", [0, -3])
def test_sliding_window_below_one_raises(window):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"got {window}"):
        flash_attention(q, k, v, sliding_window=window, implementation="pallas")


@pytest.mark.parametrize("field, value", [("block_q", 48), ("block_kv", 8), ("block_kv_bwd", 0)])
def test_bad_block_sizes_raise(field, value):
    with pytest.raises(ValueError, match=f"{field} .* got {value}"):
        PortableBlockSizes(**{field: value})


def test_block_sizes_only_for_pallas():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'xla'"):
        flash_attention(q, k, v, implementation="xla", block_sizes=PortableBlockSizes())
