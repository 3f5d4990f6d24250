"""Quantised-weight grouped matmul (pallas_kernels.quant_grouped_matmul): the
reference against a NumPy loop, the Pallas kernel (interpreted, and compiled
on GPU) against the reference, the custom VJP against jax.grad of the
reference, and the errors.

Tolerances, all in float32 on random inputs: reference vs NumPy loop and
kernel vs reference rtol 1e-5 / atol 1e-4 (outputs are O(10): the kernel
scales per-group partial sums, the reference dequantised weights, so only
the summation order differs); gradients rtol 1e-4 / atol 1e-3 (d-scales sum
M * gs products of O(10)).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kernel_modes

from pallas_kernels.quant_grouped_matmul import (
    pack_int4_groups,
    qgmm,
    qgmm_reference,
    unsupported,
)


def make(kind, m, k, n, sizes, *, group_size, asymmetric=False, seed=0, dtype=jnp.float32):
    """Random lhs, codes, scales (and zeros) for one problem."""
    lhs, codes, scales, zeros = _random(jax.random.key(seed), kind, m, k, n, len(sizes),
                                        group_size, asymmetric, jnp.dtype(dtype))
    return lhs, codes, scales, jnp.asarray(sizes, jnp.int32), zeros


@functools.partial(jax.jit, static_argnums=range(1, 9))
def _random(key, kind, m, k, n, g, group_size, asymmetric, dtype):
    ks = jax.random.split(key, 4)
    lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    scales = jax.random.uniform(ks[2], (g, k // group_size, n), minval=0.5, maxval=2.0) / 64
    zeros = None
    if kind == "int8":
        codes = jax.random.randint(ks[1], (g, k, n), -127, 128).astype(jnp.int8)
    elif kind == "fp8":
        codes = (jax.random.normal(ks[1], (g, k, n)) * 60).astype(jnp.float8_e4m3fn)
    else:
        lo, hi = (0, 16) if asymmetric else (-8, 8)
        codes = pack_int4_groups(jax.random.randint(ks[1], (g, k, n), lo, hi))
        if asymmetric:
            zeros = jax.random.randint(ks[3], scales.shape, 0, 16).astype(jnp.float32)
    return lhs, codes, scales, zeros


# jitted: op-by-op dispatch of the reference costs seconds on CPU
reference = jax.jit(qgmm_reference, static_argnames=("kind", "group_size"))


def numpy_qgmm(lhs, codes, scales, sizes, zeros, kind, group_size):
    """Row by row, group by group, straight from the layout definitions."""
    lhs, scales = np.asarray(lhs, np.float64), np.asarray(scales, np.float64)
    z = np.zeros_like(scales) if zeros is None else np.asarray(zeros, np.float64)
    if kind == "int4":  # byte [g, n, i] holds k = 2i (low nibble) and 2i + 1 (high)
        b = np.asarray(codes).astype(np.int64)
        nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:2], -1)  # [G, N, K]
        if zeros is None:
            nib = np.where(nib > 7, nib - 16, nib)
        q = nib.transpose(0, 2, 1).astype(np.float64)
    else:
        q = np.asarray(codes.astype(jnp.float32), np.float64)
    out = np.zeros((lhs.shape[0], scales.shape[2]))
    row = 0
    for e, size in enumerate(np.asarray(sizes)):
        w = np.stack([(q[e, kk] - z[e, kk // group_size]) * scales[e, kk // group_size]
                      for kk in range(lhs.shape[1])])
        for r in range(row, row + size):
            out[r] = lhs[r] @ w
        row += size
    return out


CASES = [  # kind, m, k, n, sizes, group_size, asymmetric, tiling
    ("int8", 77, 96, 40, [10, 0, 30, 17, 5], 96, False, (16, 32, 32)),  # per channel
    ("int8", 50, 64, 72, [3, 21, 0, 26], 32, False, (16, 64, 64)),
    ("fp8", 61, 96, 48, [0, 33, 12, 0, 9], 32, False, (32, 32, 16)),
    ("fp8", 40, 64, 24, [40], 64, False, None),
    ("int4", 45, 128, 40, [7, 0, 25, 2], 128, False, (16, 64, 32)),  # per channel
    ("int4", 70, 64, 56, [20, 19, 0, 22], 32, True, (16, 32, 32)),  # zero points
]


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 2, 4, 5)],
                         ids=lambda c: f"{c[0]}-gs{c[5]}{'-asym' * c[6]}")
def test_reference_matches_numpy_loop(case):
    kind, m, k, n, sizes, gs, asym, _ = case
    lhs, codes, scales, sizes, zeros = make(kind, m, k, n, sizes, group_size=gs,
                                            asymmetric=asym, seed=m)
    got = reference(lhs, codes, scales, sizes, kind=kind, group_size=gs, zeros=zeros)
    want = numpy_qgmm(lhs, codes, scales, sizes, zeros, kind, gs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.abs(want[:int(sizes.sum())]).max() > 1  # not a test of zeros
    assert not np.asarray(got)[int(sizes.sum()):].any()


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-gs{c[5]}{'-asym' * c[6]}")
def test_kernel_matches_reference(case, interpret):
    kind, m, k, n, sizes, gs, asym, tiling = case
    lhs, codes, scales, sizes, zeros = make(kind, m, k, n, sizes, group_size=gs,
                                            asymmetric=asym, seed=m + 1)
    got = qgmm(lhs, codes, scales, sizes, kind=kind, group_size=gs, zeros=zeros,
               implementation="pallas", tiling=tiling, interpret=interpret)
    want = reference(lhs, codes, scales, sizes, kind=kind, group_size=gs, zeros=zeros)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.asarray(got)[int(sizes.sum()):].any()  # rows past the groups are zero


@pytest.mark.parametrize("interpret", kernel_modes())
def test_kernel_bf16_lhs(interpret):
    """bf16 lhs: codes convert exactly and products are exact in the float32
    accumulator, so the kernel matches the reference on the same bf16 values."""
    lhs, codes, scales, sizes, _ = make("int8", 40, 64, 32, [15, 0, 20], group_size=32,
                                        seed=5, dtype=jnp.bfloat16)
    got = qgmm(lhs, codes, scales, sizes, kind="int8", group_size=32, implementation="pallas",
               interpret=interpret)
    want = reference(lhs, codes, scales, sizes, kind="int8", group_size=32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


GRAD_CASES = [  # kind, group_size, asymmetric
    ("int8", 64, False), ("int4", 32, True),
]


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("kind,gs,asym", GRAD_CASES)
def test_gradients_match_reference(kind, gs, asym, interpret):
    m, k, n, sizes = 53, 64, 40, [12, 0, 29, 4]
    lhs, codes, scales, sizes, zeros = make(kind, m, k, n, sizes, group_size=gs,
                                            asymmetric=asym, seed=7 + gs)
    cot = jax.random.normal(jax.random.key(11), (m, n))

    def loss(fn):
        return lambda x, s: jnp.sum(fn(x, s) * cot)

    kernel = lambda x, s: qgmm(x, codes, s, sizes, kind=kind, group_size=gs, zeros=zeros,
                               implementation="pallas", tiling=(16, 32, 32), interpret=interpret)
    ref = lambda x, s: reference(x, codes, s, sizes, kind=kind, group_size=gs, zeros=zeros)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(lhs, scales)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(lhs, scales)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    assert not np.asarray(got[0])[int(sizes.sum()):].any()
    assert np.abs(np.asarray(got[1])[1]).max() == 0  # the empty group
    assert np.abs(np.asarray(got[1])[0]).max() > 0


def test_xla_is_the_reference_and_auto_follows_the_platform():
    """'xla' is the reference everywhere; 'auto' is the reference on CPU and
    the compiled kernel on GPU (held to the kernel tests' tolerance)."""
    lhs, codes, scales, sizes, _ = make("int8", 20, 32, 16, [5, 15], group_size=16, seed=3)
    want = reference(lhs, codes, scales, sizes, kind="int8", group_size=16)
    exact = dict(rtol=1e-6, atol=1e-6)
    for impl, tol in (("xla", exact), ("auto", exact if jax.default_backend() == "cpu"
                                        else dict(rtol=1e-5, atol=1e-4))):
        got = jax.jit(lambda *a, impl=impl: qgmm(*a, kind="int8", group_size=16,
                                                 implementation=impl))(lhs, codes, scales, sizes)
        np.testing.assert_allclose(got, want, **tol)


def test_errors():
    lhs, codes, scales, sizes, _ = make("int8", 20, 32, 16, [5, 15], group_size=16, seed=1)
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
