"""gmm_swiglu (the SwiGLU's first grouped matmul with its activation): every
implementation, forward and gradients, against the reference on fresh random
inputs; the fused path's VJP composition with reference kernels on CPU; the
Mosaic kernel's SwiGLU epilogue in JAX's GPU interpreter and lowered for CUDA
at moe_1b's shapes.

Tolerances (relative error ||got - want|| / ||want||): 1e-5 for float32
inputs; 2e-2 for bfloat16 (the projections and h are rounded to bfloat16)."""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import gmm_swiglu, gmm_swiglu_reference, two_consumers
from pallas_kernels.grouped_matmul import swiglu as sw
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

F32_TOL, BF16_TOL = 1e-5, 2e-2


def _inputs(seed, m, k, h, sizes, dtype):
    rng = np.random.default_rng(seed)
    draw = lambda *shape, scale=1.0: jnp.asarray(
        (rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)
    return (draw(m, k), draw(len(sizes), k, h, scale=k ** -0.5),
            draw(len(sizes), k, h, scale=k ** -0.5), jnp.asarray(sizes, jnp.int32),
            draw(m, h))


def _relerr(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _check(fn, inputs, tol):
    """fn(lhs, w_gate, w_up, sizes) and its gradients against the reference's
    (computed in float32 from the same rounded inputs); rows in no group
    come out zero."""
    lhs, wg, wu, sizes, dh = inputs
    ref = lambda a, b, c: gmm_swiglu_reference(a.astype(jnp.float32), b.astype(jnp.float32),
                                               c.astype(jnp.float32), sizes)
    got, vjp = jax.vjp(lambda a, b, c: fn(a, b, c, sizes), lhs, wg, wu)
    want, ref_vjp = jax.vjp(ref, lhs, wg, wu)
    assert got.dtype == lhs.dtype and got.shape == want.shape
    assert _relerr(got, want) < tol
    for name, g, w in zip(("d-lhs", "d-w_gate", "d-w_up"), vjp(dh), ref_vjp(dh.astype(jnp.float32))):
        assert g.dtype == lhs.dtype, name
        assert _relerr(g, w) < tol, f"{name}: {_relerr(g, w):.2e}"
    assert not np.asarray(got[int(sizes.sum()):], np.float32).any()


RUNS = [pytest.param("xla", None, jnp.float32, dict(), id="xla"),
        pytest.param("ragged_dot", None, jnp.float32, dict(), id="ragged_dot"),
        pytest.param("blockspec", True, jnp.float32, dict(tiling=(16, 16, 16)),
                     id="blockspec-interpret"),
        pytest.param("mosaic_gpu", False, jnp.bfloat16, dict(consumers=2, fused=True),
                     id="mosaic_gpu-fused-compiled", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("implementation,interpret,dtype,kw", RUNS)
def test_implementation_matches_reference(implementation, interpret, dtype, kw):
    # Odd sizes, an empty group and 23 rows in no group; the fused kernel
    # needs H a multiple of its 128-column block.
    h = 256 if kw.get("fused") else 24
    m, k = (333, 200) if kw.get("fused") else (77, 40)
    sizes = (110, 0, 80, 120) if kw.get("fused") else (20, 0, 17, 17)
    inputs = _inputs(zlib.crc32(implementation.encode()), m, k, h, sizes, dtype)
    _check(functools.partial(gmm_swiglu, implementation=implementation, interpret=interpret,
                             **kw), inputs, F32_TOL if dtype == jnp.float32 else BF16_TOL)


def test_fused_vjp_composes_its_kernels():
    """The fused path's custom VJP (interleaved weights, the SwiGLU's
    gradient, the weight gradient split back) with reference kernels."""
    block = 8

    def forward(lhs, w, sizes):
        gate_up = gmm_reference(lhs, w, sizes)
        return gate_up, sw.swiglu(*sw.deinterleave(gate_up, block)).astype(lhs.dtype)

    kernels = sw.Kernels(forward=forward,
                         dlhs=lambda d, w, s: gmm_reference(d, w, s, transpose_rhs=True),
                         dw=tgmm_reference, block=block)
    inputs = _inputs(3, 61, 24, 3 * block, (10, 30, 0, 21 - 8), jnp.float32)
    _check(lambda a, b, c, s: sw._fused(a, b, c, s, kernels), inputs, F32_TOL)


def test_interleave_round_trip():
    gate, up = jnp.arange(24.0).reshape(2, 12), -jnp.arange(24.0).reshape(2, 12)
    mixed = sw.interleave(gate, up, 4)
    assert mixed[0, :8].tolist() == [0, 1, 2, 3, 0, -1, -2, -3]
    back = sw.deinterleave(mixed, 4)
    assert (back[0] == gate).all() and (back[1] == up).all()


def test_swiglu_epilogue_in_gpu_interpreter():
    """The two-consumer kernel with swiglu=True: 128-row tiles whose groups
    end inside a warpgroup's rows, an empty group and a zero tail; out and h
    against the reference."""
    tiling, h = (128, 128, 128), 128
    lhs, wg, wu, sizes, _ = _inputs(5, 270, 256, h, (100, 0, 90, 50), jnp.bfloat16)
    w = sw.interleave(wg, wu, tiling[2] // 2)
    gate_up, out = two_consumers.gmm(lhs, w, sizes, out_dtype=jnp.bfloat16, tiling=tiling,
                                     interpret=True, swiglu=True)
    want_gate_up = gmm_reference(lhs, w, sizes)
    assert _relerr(gate_up, want_gate_up) < 1e-2
    assert _relerr(out, gmm_swiglu_reference(lhs, wg, wu, sizes)) < BF16_TOL
    assert not np.asarray(out[240:], np.float32).any()


@pytest.mark.parametrize("tiling", [None, (128, 128, 128)])
def test_swiglu_kernel_lowers_for_cuda(tiling):
    """At moe_1b's gate+up shape (K=1024, 2H=1280) the ring, the staging
    tiles and h's fit the block's shared memory."""
    m, g = 1000, 8
    fn = functools.partial(two_consumers.gmm, out_dtype=jnp.bfloat16, swiglu=True,
                           tiling=tiling or two_consumers.DEFAULT_TILING)
    operands = (jnp.ones((m, 1024), jnp.bfloat16), jnp.ones((g, 1024, 1280), jnp.bfloat16),
                jnp.full((g,), m // g, jnp.int32))
    assert "mosaic_gpu" in jax.jit(fn).trace(*operands).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kw,match", [
    (dict(implementation="xla", fused=True), "fused=True cannot be honoured.*'xla'"),
    (dict(implementation="xla", fused=1), "fused must be a bool"),
])
def test_rejects_what_it_cannot_do(kw, match):
    lhs, wg, wu, sizes, _ = _inputs(0, 16, 8, 4, (8, 8), jnp.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        gmm_swiglu(lhs, wg, wu, sizes, **kw)


def test_rejects_mismatched_weights():
    lhs, wg, wu, sizes, _ = _inputs(0, 16, 8, 4, (8, 8), jnp.float32)
    with pytest.raises(ValueError, match="w_gate and w_up must both be"):
        gmm_swiglu(lhs, wg, wu[:, :, :3], sizes)
