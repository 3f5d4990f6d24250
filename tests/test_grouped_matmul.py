"""Grouped matmul (gmm, tgmm and gmm's custom VJP) against the pure-jnp
reference, on balanced, random, empty-group and M > sum(group_sizes) routings
at odd shapes.

Interpreted mode runs the portable BlockSpec kernel; compiled mode (GPU) runs
the Mosaic GPU kernel, which needs 16-bit inputs and so must refuse float32.
Shapes stay fixed per test so one compiled function serves every routing.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kernel_modes

from pallas_kernels import compat
from pallas_kernels.grouped_matmul import gmm, gmm_reference, tgmm, tgmm_reference
from pallas_kernels.grouped_matmul import mosaic_gpu

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
ROUTINGS = ("balanced", "random", "empty_groups", "rows_past_groups")
G = 5
# Interpreted: ragged row tile, K padded 40 -> 48, partial N tile.
# Compiled: M, K, N all misaligned (padded for TMA), partial tiles.
SHAPES = {True: dict(m=77, k=40, n=24, tiling=(16, 16, 16)),
          False: dict(m=333, k=200, n=136, tiling=None)}

_gmm = jax.jit(gmm, static_argnames=("implementation", "tiling", "interpret",
                                     "preferred_element_type", "transpose_rhs"))
_tgmm = jax.jit(tgmm, static_argnames=("implementation", "tiling", "interpret",
                                       "preferred_element_type"))


def routing(kind: str, m: int, seed: int):
    """Group sizes [G] for a routing kind; sums to m except rows_past_groups."""
    rng = np.random.default_rng(seed)
    if kind == "balanced":
        sizes = np.full(G, m // G)
        sizes[-1] += m - sizes.sum()
    elif kind == "random":
        sizes = rng.multinomial(m, rng.dirichlet(np.full(G, 0.5)))
    elif kind == "empty_groups":
        sizes = np.zeros(G, int)
        sizes[[0, 2, 4]] = rng.multinomial(m, [0.2, 0.5, 0.3])
    else:
        sizes = rng.multinomial(m - 23, np.full(G, 1 / G))
    return jnp.asarray(sizes, jnp.int32)


def inputs(seed, dtype, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(x).all()
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def pallas_kwargs(interpret):
    return dict(implementation="pallas", interpret=interpret,
                tiling=SHAPES[interpret]["tiling"])


def refuses_float32(interpret, dtype):
    """The compiled (Mosaic GPU) kernel has no float32 path and must say so."""
    return (not interpret) and dtype == jnp.float32


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ROUTINGS)
def test_gmm_forward(interpret, dtype, kind):
    s = SHAPES[interpret]
    seed = ROUTINGS.index(kind)
    lhs, rhs = inputs(seed, dtype, (s["m"], s["k"]), (G, s["k"], s["n"]))
    sizes = routing(kind, s["m"], seed)
    if refuses_float32(interpret, dtype):
        with pytest.raises(ValueError, match="float32"):
            _gmm(lhs, rhs, sizes, **pallas_kwargs(interpret))
        return
    out = _gmm(lhs, rhs, sizes, **pallas_kwargs(interpret))
    ref = gmm_reference(lhs, rhs, sizes)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # Rows in no group are exactly zero (also checks they were written).
    assert not np.asarray(out[int(sizes.sum()):], np.float32).any()


@pytest.mark.parametrize("interpret", kernel_modes())
def test_gmm_transposed_rhs_f32_out(interpret):
    s = SHAPES[interpret]
    lhs, rhs = inputs(7, jnp.bfloat16, (s["m"], s["k"]), (G, s["n"], s["k"]))
    sizes = routing("rows_past_groups", s["m"], 7)
    out = _gmm(lhs, rhs, sizes, transpose_rhs=True, preferred_element_type=jnp.float32,
               **pallas_kwargs(interpret))
    ref = gmm_reference(lhs, rhs, sizes, transpose_rhs=True, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert rel_err(out, ref) < 1e-5   # bf16 products are exact in float32


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ROUTINGS)
def test_tgmm(interpret, dtype, kind):
    s = SHAPES[interpret]
    seed = 10 + ROUTINGS.index(kind)
    lhs, dout = inputs(seed, dtype, (s["m"], s["k"]), (s["m"], s["n"]))
    sizes = routing(kind, s["m"], seed)
    if refuses_float32(interpret, dtype):
        with pytest.raises(ValueError, match="float32"):
            _tgmm(lhs, dout, sizes, **pallas_kwargs(interpret))
        return
    out = _tgmm(lhs, dout, sizes, **pallas_kwargs(interpret))
    ref = tgmm_reference(lhs, dout, sizes)
    assert out.shape == (G, s["k"], s["n"]) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    for g in np.flatnonzero(np.asarray(sizes) == 0):
        assert not np.asarray(out[g], np.float32).any()


@functools.partial(jax.jit, static_argnames=("interpret", "transpose_rhs"))
def _pallas_vjp(lhs, rhs, sizes, cot, interpret, transpose_rhs):
    f = lambda a, b: gmm(a, b, sizes, transpose_rhs=transpose_rhs, **pallas_kwargs(interpret))
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(cot))


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ROUTINGS)
def test_gmm_vjp(interpret, dtype, kind):
    s = SHAPES[interpret]
    seed = 20 + ROUTINGS.index(kind)
    # transpose_rhs alternates so both backward layouts are covered.
    transpose_rhs = kind in ("random", "rows_past_groups")
    rhs_shape = (G, s["n"], s["k"]) if transpose_rhs else (G, s["k"], s["n"])
    lhs, rhs, cot = inputs(seed, dtype, (s["m"], s["k"]), rhs_shape, (s["m"], s["n"]))
    sizes = routing(kind, s["m"], seed)
    if refuses_float32(interpret, dtype):
        with pytest.raises(ValueError, match="float32"):
            _pallas_vjp(lhs, rhs, sizes, cot, interpret, transpose_rhs)
        return
    out, dlhs, drhs = _pallas_vjp(lhs, rhs, sizes, cot, interpret, transpose_rhs)
    ref_f = lambda a, b: gmm_reference(a, b, sizes, transpose_rhs=transpose_rhs)
    ref_out, ref_vjp = jax.vjp(ref_f, lhs, rhs)
    ref_dlhs, ref_drhs = ref_vjp(cot)
    for got, want in ((out, ref_out), (dlhs, ref_dlhs), (drhs, ref_drhs)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_err(got, want) < TOL[dtype]


def test_ragged_dot_peer_matches_reference():
    lhs, rhs, dout = inputs(30, jnp.float32, (61, 24), (G, 24, 40), (61, 40))
    sizes = routing("rows_past_groups", 61, 30)
    out = gmm(lhs, rhs, sizes, implementation="ragged_dot")
    assert rel_err(out, gmm_reference(lhs, rhs, sizes)) < 1e-5
    assert not np.asarray(out[int(sizes.sum()):]).any()
    t = tgmm(lhs, dout, sizes, implementation="ragged_dot")
    assert rel_err(t, tgmm_reference(lhs, dout, sizes)) < 1e-5


# The Mosaic GPU kernel itself, in JAX's GPU interpreter on CPU. jax 0.10's
# interpreter handles only gmm without transposes and N a multiple of the tile.
MOSAIC_OPS = ["gmm"] + (["gmm_transposed", "tgmm"] if compat.MOSAIC_GPU_INTERPRET_FULL else [])


@pytest.mark.parametrize("op", MOSAIC_OPS)
def test_mosaic_kernel_in_gpu_interpreter(op):
    m, k, n, tiling = 203, 128, 128, (64, 64, 64)
    sizes = jnp.array([70, 0, 59, 40], jnp.int32)   # empty group and 34 rows past the groups
    a, b, c = inputs(40, jnp.bfloat16, (m, k), (4, k, n), (m, n))
    f32 = jnp.float32
    if op == "gmm":
        out = mosaic_gpu.gmm(a, b, sizes, out_dtype=f32, tiling=tiling, interpret=True)
        ref = gmm_reference(a, b, sizes, preferred_element_type=f32)
    elif op == "gmm_transposed":
        out = mosaic_gpu.gmm(c, b, sizes, transpose_rhs=True, out_dtype=f32, tiling=tiling,
                             interpret=True)
        ref = gmm_reference(c, b, sizes, transpose_rhs=True, preferred_element_type=f32)
    else:
        out = mosaic_gpu.tgmm(a, c, sizes, out_dtype=f32, tiling=tiling, interpret=True)
        ref = tgmm_reference(a, c, sizes, preferred_element_type=f32)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(lhs=(4, 8, 2)), "lhs must be"),
    (dict(rhs=(G, 9, 6)), "contraction sizes differ"),
    (dict(rhs=(G, 8)), "rhs must be"),
    (dict(sizes=[2, 2]), "2 groups but rhs has 5"),
    (dict(sizes=[1.0] * G), "must be integers"),
    (dict(sizes=[3, -1, 2, 0, 0]), "non-negative"),
    (dict(sizes=[4, 4, 4, 4, 4]), "exceeds the 12 rows"),
    (dict(rhs_dtype=jnp.bfloat16), "dtypes differ"),
    (dict(lhs_dtype=jnp.int32, rhs_dtype=jnp.int32), "unsupported dtype"),
    (dict(implementation="cuda"), "unknown grouped matmul implementation"),
    (dict(implementation="xla", tiling=(8, 8, 8)), "takes no tiling"),
    (dict(implementation="pallas", tiling=(8, 0, 8)), "three positive ints"),
])
def test_gmm_rejects_bad_input(bad, match):
    lhs = jnp.ones(bad.get("lhs", (12, 8)), bad.get("lhs_dtype", jnp.float32))
    rhs = jnp.ones(bad.get("rhs", (G, 8, 6)), bad.get("rhs_dtype", jnp.float32))
    sizes = jnp.asarray(bad.get("sizes", [2] * G))
    with pytest.raises(ValueError, match=match):
        gmm(lhs, rhs, sizes, implementation=bad.get("implementation", "pallas"),
            tiling=bad.get("tiling"))


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
