"""Quantised-weight grouped matmul (pallas_kernels.quant_grouped_matmul):
the reference and the portable kernel (interpreted, and compiled on GPU) on
the shared case table (quant_grouped_matmul_cases.py), forward and
gradients; which cases each takes; and the errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from case_table import case_params, refusals
from quant_grouped_matmul_cases import CASES, RUNS, check, problem

from pallas_kernels.quant_grouped_matmul import pack_int4_groups, qgmm, unsupported
from pallas_kernels.quant_grouped_matmul.api import TABLE


@pytest.mark.parametrize("name,implementation,interpret", case_params(CASES, RUNS, problem))
def test_implementation_matches_numpy_loop(name, implementation, interpret):
    check(name, implementation, interpret)


def test_auto_runs_a_case_wherever_it_runs():
    """'auto': the reference on CPU, the compiled kernel on GPU."""
    check("int8_gs32", "auto", None)


def test_case_table_coverage():
    """Every implementation of the table runs every kind, with and without
    zero points; the portable kernel leaves out the cases its dispatch entry
    refuses (scale groups with no K step), which raise that reason."""
    assert sorted({run.values[0] for run in RUNS}) == sorted(TABLE.supports)
    refused = refusals(CASES, RUNS, problem)
    for run in RUNS:
        taken = [c for n, c in CASES.items() if (n, run.id) not in refused]
        assert {(c.kind, c.asymmetric) for c in taken} == {
            ("int8", False), ("fp8", False), ("int4", False), ("int4", True)}, run.id
    assert {n for n, _ in refused} == {"int4_gs16"}
    assert {run for _, run in refused} == {"blockspec-interpret", "blockspec-compiled"}
    for (name, run), reason in refused.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            check(name, "blockspec", run == "blockspec-interpret")


def test_errors():
    lhs, codes = jnp.ones((20, 32)), jnp.ones((2, 32, 16), jnp.int8)
    scales, sizes = jnp.ones((2, 2, 16)), jnp.array([5, 15])
    kw = dict(kind="int8", group_size=16)
    with pytest.raises(ValueError, match="'bogus'"):
        qgmm(lhs, codes, scales, sizes, kind="bogus", group_size=16)
    with pytest.raises(ValueError, match="'ragged_dot'"):
        qgmm(lhs, codes, scales, sizes, implementation="ragged_dot", **kw)
    with pytest.raises(ValueError, match="group_size=12"):
        qgmm(lhs, codes, scales, sizes, kind="int8", group_size=12)
    with pytest.raises(ValueError, match="takes float8_e4m3fn codes; got int8"):
        qgmm(lhs, codes, scales, sizes, kind="fp8", group_size=16)
    with pytest.raises(ValueError, match="K=16 of lhs"):
        qgmm(lhs[:, :16], codes, scales, sizes, **kw)
    with pytest.raises(ValueError, match=r"\(2, 2, 16\)"):
        qgmm(lhs, codes, scales[:, :1], sizes, **kw)
    with pytest.raises(ValueError, match="group_sizes must be"):
        qgmm(lhs, codes, scales, sizes[:1], **kw)
    with pytest.raises(ValueError, match="exceeds the 20 rows"):
        qgmm(lhs, codes, scales, jnp.array([15, 15]), **kw)
    with pytest.raises(ValueError, match="non-negative"):
        qgmm(lhs, codes, scales, jnp.array([-1, 5]), **kw)
    with pytest.raises(ValueError, match="only for kind 'int4'"):
        qgmm(lhs, codes, scales, sizes, zeros=scales, **kw)
    with pytest.raises(ValueError, match="lhs has dtype int32"):
        qgmm(lhs.astype(jnp.int32), codes, scales, sizes, **kw)
    with pytest.raises(ValueError, match="powers of two"):
        qgmm(lhs, codes, scales, sizes, implementation="pallas", tiling=(16, 24, 16), **kw)
    with pytest.raises(ValueError, match="takes no tiling"):
        qgmm(lhs, codes, scales, sizes, implementation="xla", tiling=(16, 16, 16), **kw)
    with pytest.raises(ValueError, match="int4 codes must be"):
        qgmm(lhs, pack_int4_groups(jnp.zeros((2, 16, 16), jnp.int32)), scales, sizes,
             kind="int4", group_size=16)
    # a scale group with no power-of-two K step >= 32 for int4: the kernel refuses, by name
    assert unsupported("int4", 16) and unsupported("int8", 16) is None
    c4 = pack_int4_groups(jnp.ones((2, 32, 16), jnp.int32))
    with pytest.raises(ValueError, match="group_size=16"):
        qgmm(lhs, c4, scales, sizes, kind="int4", group_size=16, implementation="pallas",
             interpret=True)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            qgmm(lhs, codes, scales, sizes, implementation="pallas", interpret=False, **kw)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_default_tiling_follows_rows_per_expert(kind):
    """Few rows per expert take the decode tiling, many the prefill one; every
    tuned tiling is valid and runs the group-128 layout the benchmark tunes."""
    from pallas_kernels.quant_grouped_matmul.api import TUNED_TILINGS, default_tiling
    assert default_tiling(kind, 64, 8) == TUNED_TILINGS["decode"][kind]
    assert default_tiling(kind, 8192, 8) == TUNED_TILINGS["prefill"][kind]
    assert default_tiling(kind, 33 * 8, 8) == TUNED_TILINGS["prefill"][kind]
    for regime in TUNED_TILINGS.values():
        tiling = regime[kind]
        assert all(t & (t - 1) == 0 for t in tiling)
        assert unsupported(kind, 128, tiling) is None


@pytest.mark.parametrize("implementation,interpret", [
    pytest.param("xla", None, id="xla"), pytest.param("blockspec", True, id="blockspec-interpret")])
def test_traced_group_sizes_are_clamped(implementation, interpret):
    """Under jit, negative sizes count as 0 and groups are cut at M (rows past
    the clamped sum come out zero), as in grouped_matmul (rtol and atol 1e-5:
    float32 sums of 32 products up to ~50 in another order)."""
    rng = np.random.default_rng(5)
    lhs = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
    codes = jnp.asarray(rng.integers(-7, 8, (3, 32, 16)), jnp.int8)
    scales = jnp.asarray(rng.uniform(0.5, 1.5, (3, 1, 16)), jnp.float32)
    kw = dict(kind="int8", group_size=32)
    out = jax.jit(lambda sizes: qgmm(lhs, codes, scales, sizes, implementation=implementation,
                                     interpret=interpret, **kw))(jnp.array([2, -3, 4]))
    want = qgmm(lhs, codes, scales, jnp.array([2, 0, 4]), implementation="xla", **kw)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(out[6:]).any() and np.asarray(want[2:6]).any()
