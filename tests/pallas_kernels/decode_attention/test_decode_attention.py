"""The reference (implementation='xla') and the portable Pallas kernel on the
decode case table (decode_cases.py), the kernel interpreted on CPU and
compiled on a GPU; the reference's logsumexp and gradients; the kernels'
refusal to be differentiated.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from case_table import case_params, refusals
from conftest import kernel_modes
from decode_cases import CASES, F32_TOL, Case, case_inputs, check, expected, relative_error

from pallas_kernels.decode_attention import (decode_attention,
                                             decode_attention_reference_with_lse)
from pallas_kernels.decode_attention.api import portable_kernel
from pallas_kernels.decode_attention.splits import default_splits

# (implementation, mode): the reference runs on the default device, the
# portable kernel interpreted on CPU and compiled on a GPU; on CPU it is also
# lowered through Pallas's Triton lowering (what a GPU compiles).
RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("blockspec", "interpret", id="blockspec-interpret"),
        pytest.param("blockspec", "lower", id="blockspec-lower"),
        pytest.param("blockspec", "compiled", id="blockspec-compiled", marks=pytest.mark.gpu)]


def problem(case, implementation, mode):
    """Every case suits the reference and the portable kernel."""
    del case, implementation, mode


def test_case_table_coverage():
    assert refusals(CASES, RUNS, problem) == {}
    assert {c.k_format for c in CASES.values()} >= {None, "int8", "fp8", "kivi2"}
    assert any(c.page_size for c in CASES.values())
    assert any(c.sliding_window and max(c.lengths) > c.capacity for c in CASES.values())
    assert {c.num_queries for c in CASES.values()} == {1, 3}
    assert {0, 1} <= {n for c in CASES.values() for n in c.lengths}


@pytest.mark.parametrize("name,implementation,mode", case_params(CASES, RUNS, problem))
def test_implementation_matches_expectation(name, implementation, mode):
    case = CASES[name]
    tiling = {} if implementation == "xla" else case.tiling()
    if case.page_size or case.k_format == "kivi2":  # these step by page or key group
        tiling.pop("block_kv", None)

    if mode == "lower":
        kernel = functools.partial(portable_kernel(case_inputs(name)[0][1]), interpret=False,
                                   **case.kwargs(), **tiling)
        lowered = jax.jit(kernel).trace(*case_inputs(name)[0]).lower(
            lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == 1
        return

    if implementation != "xla":
        tiling["interpret"] = mode == "interpret"

    def attention(q, k, v, lengths, page_table):
        return decode_attention(q, k, v, lengths, page_table=page_table,
                                implementation=implementation, **tiling, **case.kwargs())
    check(name, jax.jit(attention))


def test_reference_logsumexp():
    """The reference's logsumexp against float64: -inf where a query sees
    nothing (length 0)."""
    name = "t3_mqa_d128"
    case = CASES[name]
    (q, k, v, lengths, _), _ = case_inputs(name)
    _, lse = decode_attention_reference_with_lse(q, k, v, lengths, **case.kwargs())
    qf, kf = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scale = case.head_dim ** -0.5
    for b, L in enumerate(case.lengths):
        for t in range(case.num_queries):
            pos = L - case.num_queries + t
            for h in range(case.heads):
                if pos < 0:
                    assert lse[b, t, h] == -np.inf
                    continue
                logits = kf[b, :pos + 1, 0] @ qf[b, t, h] * scale
                want = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
                assert abs(float(lse[b, t, h]) - want) < 1e-5


def test_reference_gradients_match_float64():
    """The reference is differentiable: dq, dk, dv of <out, cotangent> against
    the softmax gradients written out in float64 (a contiguous cache with
    the ring wrapped and a window)."""
    case = Case((29, 11), 2, 4, 2, 16, 16, sliding_window=9)
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((2, 2, 4, 16), (2, 16, 2, 16), (2, 16, 2, 16)))
    lengths = jnp.asarray(case.lengths, jnp.int32)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):
        out = decode_attention(q, k, v, lengths, implementation="xla", **case.kwargs())
        return jnp.sum(out * cot)
    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    want = _float64_grads(case, *(np.asarray(x, np.float64) for x in (q, k, v, cot)))
    for what, g, w in zip(("dq", "dk", "dv"), got, want):
        assert relative_error(g, w) < F32_TOL, what


def _float64_grads(case, q, k, v, cot):
    """dq, dk, dv of sum(out * cot), per query and head over the slots it
    sees (slot s holds position L-1 - ((L-1-s) mod C))."""
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    C, G, T = k.shape[1], q.shape[2] // k.shape[2], q.shape[1]
    scale = q.shape[3] ** -0.5
    for b, L in enumerate(case.lengths):
        slots = np.arange(C)
        pos = L - 1 - (L - 1 - slots) % C
        for t in range(T):
            qp = L - T + t
            seen = slots[(pos >= 0) & (pos <= qp) & (pos > qp - case.sliding_window)]
            for h in range(q.shape[2]):
                kv = h // G
                s = k[b, seen, kv] @ q[b, t, h] * scale
                p = np.exp(s - s.max())
                p /= p.sum()
                dp = v[b, seen, kv] @ cot[b, t, h]
                ds = p * (dp - p @ dp) * scale
                dq[b, t, h] += ds @ k[b, seen, kv]
                dk[b, seen, kv] += ds[:, None] * q[b, t, h]
                dv[b, seen, kv] += p[:, None] * cot[b, t, h]
    return dq, dk, dv


@pytest.mark.parametrize("interpret", kernel_modes())
def test_kernels_refuse_differentiation(interpret):
    (q, k, v, lengths, _), _ = case_inputs("t1_gqa_d64")

    def loss(q):
        return decode_attention(q, k, v, lengths, implementation="blockspec",
                                interpret=interpret).sum()
    with pytest.raises(TypeError, match="implementation='blockspec' is inference-only"):
        jax.grad(loss)(q)
    with pytest.raises(TypeError, match="inference-only"):
        jax.jvp(loss, (q,), (q,))


@pytest.mark.parametrize("interpret", kernel_modes())
def test_splits_cover_every_block_once(interpret):
    """Every split count, from one to one per block, gives the same result."""
    name = "t1_gqa_d64"
    case = CASES[name]
    args = case_inputs(name)[0]
    outs = [decode_attention(*args[:4], implementation="blockspec", interpret=interpret,
                             block_kv=16, num_splits=n) for n in (1, 3)]
    want = expected(case, *case_inputs(name)[1])
    for out in outs:
        assert relative_error(out, want) < F32_TOL


@pytest.mark.parametrize("programs,blocks,sms,want", [
    (8, 64, 132, 16), (64, 256, 132, 2), (512, 64, 132, 1), (8, 4, 132, 4), (1, 1, 132, 1)])
def test_default_splits_fill_the_waves(programs, blocks, sms, want):
    assert default_splits(programs, blocks, sms) == want
