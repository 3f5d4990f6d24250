"""Grouped matmul (gmm, tgmm and gmm's custom VJP): every implementation on
the shared case table (grouped_matmul_cases.py), the cases an
implementation's dispatch entry refuses raising its reason, and the
argument checks."""
import functools
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from case_table import case_params, refusals
from grouped_matmul_cases import (CASES, GPU_INTERPRETER_OPS, ROUTINGS, api_gmm, api_tgmm, check,
                                  gpu_interpreter_problem, inputs, problem)

from pallas_kernels.grouped_matmul import gmm, mosaic_gpu, tgmm, two_consumers
from pallas_kernels.grouped_matmul.api import TABLE
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

G = 5
# (implementation, interpret): the portable kernel runs interpreted only, the
# Mosaic kernel compiled only; the others take no interpret.
RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("ragged_dot", None, id="ragged_dot"),
        pytest.param("blockspec", True, id="blockspec-interpret"),
        pytest.param("mosaic_gpu", False, id="mosaic_gpu-compiled", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("name,implementation,interpret", case_params(CASES, RUNS, problem))
def test_implementation_matches_reference(name, implementation, interpret):
    check(name, api_gmm(name, implementation, interpret),
          api_tgmm(name, implementation, interpret))


@pytest.mark.parametrize("name,op", case_params(
    CASES, [pytest.param(op, id=op) for op in GPU_INTERPRETER_OPS], gpu_interpreter_problem))
def test_mosaic_kernel_in_gpu_interpreter(name, op):
    case = CASES[name]
    kernels = two_consumers if case.consumers == 2 else mosaic_gpu
    kw = dict(tiling=case.mosaic_tiling, interpret=True)
    if op == "tgmm":
        check(name, tgmm_fn=lambda lhs, dout, sizes: kernels.tgmm(
            lhs, dout, sizes, out_dtype=case.dtype, **kw))
        return
    swap = op == "gmm_transposed_rhs"

    def kernel(lhs, rhs, sizes):
        extra = dict(pingpong=True) if case.pingpong else {}
        return kernels.gmm(lhs, rhs.swapaxes(1, 2) if swap else rhs, sizes,
                           transpose_rhs=case.transpose_rhs != swap,
                           out_dtype=case.out_dtype or case.dtype, **kw, **extra)
    check(name, kernel, gradients=False)  # the kernel alone has no VJP


def test_case_table_coverage():
    """Every implementation of the table runs every routing and both rhs
    layouts; the cases one leaves out are the ones its dispatch entry
    refuses (the Mosaic kernel: float32; the others: consumers=2), and
    through the API those raise that reason."""
    assert sorted(run.values[0] for run in RUNS) == sorted(TABLE.supports)
    refused = refusals(CASES, RUNS, problem)
    for run in RUNS:
        taken = [c for n, c in CASES.items() if (n, run.id) not in refused]
        assert {c.routing for c in taken} >= set(ROUTINGS), run.id
        assert {c.transpose_rhs for c in taken} == {False, True}, run.id
    assert sorted(refused) == sorted(
        [(n, "mosaic_gpu-compiled") for n, c in CASES.items() if c.dtype == jnp.float32]
        + [(n, run.id) for n, c in CASES.items() if c.consumers == 2 for run in RUNS
           if run.id != "mosaic_gpu-compiled"])
    runs = {run.id: run.values for run in RUNS}
    for (name, run_id), reason in refused.items():
        lhs, rhs, sizes, _ = inputs(name)
        with pytest.raises(ValueError, match=re.escape(reason)):
            api_gmm(name, *runs[run_id])(lhs, rhs, sizes)
    assert any(gpu_interpreter_problem(c, "gmm") is None for c in CASES.values())


def test_compiled_calls_pass_their_dispatch_checks():
    """The gmm and tgmm calls a compiled case makes pass the Mosaic entry's
    checks (a ping-pong case's tgmm takes the default tiling): checked on
    CPU, so a case cannot fail only on a GPU by refusing its own arguments."""
    for name, case in CASES.items():
        if problem(case, "mosaic_gpu", False) is not None:
            continue
        for op, call in (("gmm", api_gmm), ("tgmm", api_tgmm)):
            kw = call(name, "mosaic_gpu", False).keywords
            assert TABLE.supports["mosaic_gpu"](SimpleNamespace(
                dtype=jnp.dtype(case.dtype), tiling=kw["tiling"], interpret=False,
                consumers=kw["consumers"], pingpong=kw.get("pingpong", False), op=op,
                out_dtype=jnp.dtype(case.out_dtype or case.dtype))) is None, (name, op)


@pytest.mark.parametrize("bad, match", [
    (dict(lhs=(4, 8, 2)), "lhs must be"),
    (dict(rhs=(G, 9, 6)), "contraction sizes differ"),
    (dict(rhs=(G, 8)), "rhs must be"),
    (dict(sizes=[2, 2]), "2 groups but rhs has 5"),
    (dict(sizes=[3, -1, 2, 0, 0]), "non-negative"),
    (dict(sizes=[4, 4, 4, 4, 4]), "exceeds the 12 rows"),
    (dict(rhs_dtype=jnp.bfloat16), "dtypes differ"),
    (dict(lhs_dtype=jnp.int32, rhs_dtype=jnp.int32), "unsupported dtype"),
    (dict(implementation="cuda"), "unknown grouped matmul implementation"),
    (dict(implementation="xla", tiling=(8, 8, 8)), "takes no tiling"),
    (dict(implementation="xla", consumers=2), "takes no consumers"),
    (dict(consumers=3), "consumers must be 1 or 2, got 3"),
    (dict(implementation="mosaic_gpu", lhs_dtype=jnp.bfloat16, rhs_dtype=jnp.bfloat16,
          rhs=(G, 8, 64), consumers=2, tiling=(64, 64, 128)), "must be 128 or 256"),
    (dict(implementation="mosaic_gpu", lhs_dtype=jnp.bfloat16, rhs_dtype=jnp.bfloat16,
          rhs=(G, 8, 64), consumers=2, tiling=(256, 64, 256)),
     "needs 256 float32 accumulator registers a thread; at most 128 fit"),
])
def test_gmm_rejects_bad_input(bad, match):
    lhs = jnp.ones(bad.get("lhs", (12, 8)), bad.get("lhs_dtype", jnp.float32))
    rhs = jnp.ones(bad.get("rhs", (G, 8, 6)), bad.get("rhs_dtype", jnp.float32))
    sizes = jnp.asarray(bad.get("sizes", [2] * G))
    with pytest.raises(ValueError, match=match):
        gmm(lhs, rhs, sizes, implementation=bad.get("implementation", "pallas"),
            tiling=bad.get("tiling"), consumers=bad.get("consumers", 1))


def test_tgmm_rejects_bad_input():
    with pytest.raises(ValueError, match="dout must be"):
        tgmm(jnp.ones((12, 8)), jnp.ones((11, 6)), jnp.full((G,), 2))
    with pytest.raises(ValueError, match="dtypes differ"):
        tgmm(jnp.ones((12, 8)), jnp.ones((12, 6), jnp.bfloat16), jnp.full((G,), 2))


def test_mosaic_kernel_rejects_what_it_cannot_do():
    sizes = jnp.full((G,), 2)
    with pytest.raises(ValueError, match="multiples of 64"):
        mosaic_gpu.tgmm(jnp.ones((12, 64), jnp.bfloat16), jnp.ones((12, 64), jnp.bfloat16),
                        sizes, out_dtype=jnp.bfloat16, tiling=(32, 64, 64))
    with pytest.raises(ValueError, match="float32"):
        mosaic_gpu.gmm(jnp.ones((12, 64)), jnp.ones((G, 64, 64)), sizes, out_dtype=jnp.float32)
    x = jnp.ones((12, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"tgmm K tile .* got tiling \(128, 64, 128\)"):
        two_consumers.tgmm(x, x, sizes, out_dtype=jnp.bfloat16, tiling=(128, 64, 128))
    with pytest.raises(ValueError, match="does not fit in shared memory"):
        two_consumers.gmm(x, jnp.ones((G, 64, 64), jnp.bfloat16), sizes, out_dtype=jnp.bfloat16,
                          tiling=(256, 128, 128))
    with pytest.raises(ValueError, match="consumers=2 stores 16-bit outputs only; got float32"):
        two_consumers.tgmm(x, x, sizes, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="consumers=2 stores 16-bit outputs only; got float32"):
        gmm(x, jnp.ones((G, 64, 64), jnp.bfloat16), sizes, implementation="mosaic_gpu",
            preferred_element_type=jnp.float32, consumers=2)
    w = jnp.ones((G, 64, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"pingpong gmm tiling \(128, 64, 256\) needs 256"):
        two_consumers.gmm(x, w, sizes, out_dtype=jnp.bfloat16, tiling=(128, 64, 256),
                          pingpong=True)
    with pytest.raises(ValueError, match=r"row tile must be 64 or 128; got tiling \(256"):
        two_consumers.gmm(x, w, sizes, out_dtype=jnp.bfloat16, tiling=(256, 64, 64),
                          pingpong=True)
    with pytest.raises(ValueError, match="pingpong=True .* needs consumers=2, got consumers=1"):
        gmm(x, w, sizes, implementation="mosaic_gpu", pingpong=True)


# The two-consumer kernels at moe_1b's expert shapes (K=1024, N=1280 and
# K=640, N=1024; fewer rows), lowered for CUDA: the ring and staging tiles
# fit the block's shared memory (the lowering checks it exactly). pingpong:
# the gmm whose consumers take whole items in turn, at both layouts.
@pytest.mark.parametrize("op", ["gmm", "gmm_transposed_rhs", "tgmm", "pingpong",
                                "pingpong_transposed_rhs"])
@pytest.mark.parametrize("k,n", [(1024, 1280), (640, 1024)])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
def test_two_consumer_kernels_lower_for_cuda(op, k, n, out_dtype):
    m, g = 1000, 8
    lhs = jnp.ones((m, k), jnp.bfloat16)
    sizes = jnp.full((g,), m // g, jnp.int32)
    if op == "tgmm":
        fn = functools.partial(two_consumers.tgmm, out_dtype=out_dtype)
        operands = (lhs, jnp.ones((m, n), jnp.bfloat16), sizes)
    else:
        transpose = op.endswith("transposed_rhs")
        fn = functools.partial(two_consumers.gmm, transpose_rhs=transpose, out_dtype=out_dtype,
                               pingpong=op.startswith("pingpong"))
        operands = (lhs, jnp.ones((g, n, k) if transpose else (g, k, n), jnp.bfloat16), sizes)
    text = jax.jit(fn).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("implementation,interpret",
                         [run for run in RUNS if run.id != "mosaic_gpu-compiled"])
@pytest.mark.parametrize("traced, clamped", [
    ([-2, 3, 9], [0, 3, 5]),    # a negative size counts as 0; the last group is cut at M=8
    ([2, -1, 3], [2, 0, 3]),    # rows past the clamped sum (5..7) come out zero
    ([6, -4, 5], [6, 0, 2]),    # a negative size does not pull later groups back
])
def test_traced_group_sizes_are_clamped(implementation, interpret, traced, clamped):
    """Under jit group_sizes cannot be checked: the result is the documented
    one, that of the clamped sizes (float32, atol 1e-5)."""
    rng = np.random.default_rng(7)
    lhs = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    kw = dict(implementation=implementation, interpret=interpret,
              tiling=(16, 16, 16) if implementation == "blockspec" else None)
    out, grads = jax.jit(lambda sizes: (gmm(lhs, rhs, sizes, **kw),
                                        tgmm(lhs, dout, sizes, **kw)))(jnp.array(traced))
    want = jnp.array(clamped)
    np.testing.assert_allclose(out, gmm_reference(lhs, rhs, want), atol=1e-5)
    np.testing.assert_allclose(grads, tgmm_reference(lhs, dout, want), atol=1e-5)
    assert not np.asarray(out[sum(clamped):]).any()
