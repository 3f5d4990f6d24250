"""swiglu_ffn (the experts' SwiGLU feed-forward over grouped rows): every
implementation, forward and gradients, against the reference on fresh random
inputs; the fused path's VJP composition with reference kernels on CPU; the
Mosaic kernel's two SwiGLU epilogues in JAX's GPU interpreter and lowered for
CUDA at moe_1b's shapes.

Tolerances (relative error ||got - want|| / ||want||): 1e-5 for float32
inputs; 2e-2 for bfloat16 (the projections, h and dh are rounded to
bfloat16)."""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import swiglu_ffn, swiglu_ffn_reference, two_consumers
from pallas_kernels.grouped_matmul import swiglu as sw
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

F32_TOL, BF16_TOL = 1e-5, 2e-2


def _inputs(seed, m, d, h, sizes, dtype):
    """lhs, w_gate, w_up, w_down, group sizes and the output's cotangent."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape, scale=1.0: jnp.asarray(
        (rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)
    g = len(sizes)
    return (draw(m, d), draw(g, d, h, scale=d ** -0.5), draw(g, d, h, scale=d ** -0.5),
            draw(g, h, d, scale=h ** -0.5), jnp.asarray(sizes, jnp.int32), draw(m, d))


def _relerr(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _check(fn, inputs, tol):
    """fn(lhs, w_gate, w_up, w_down, sizes) and its four gradients against
    the reference's (in float32 from the same rounded inputs); rows in no
    group come out zero."""
    *args, sizes, cot = inputs
    f32 = lambda x: x.astype(jnp.float32)
    got, vjp = jax.vjp(lambda *a: fn(*a, sizes), *args)
    want, ref_vjp = jax.vjp(lambda *a: swiglu_ffn_reference(*a, sizes), *map(f32, args))
    assert got.dtype == args[0].dtype and got.shape == want.shape
    assert _relerr(got, want) < tol, _relerr(got, want)
    names = ("d-lhs", "d-w_gate", "d-w_up", "d-w_down")
    for name, g, w in zip(names, vjp(cot), ref_vjp(f32(cot))):
        assert g.dtype == args[0].dtype, name
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
    # Odd sizes, an empty group and 23 rows in no group; the fused kernels
    # need H a multiple of their 128-column block.
    fused = kw.get("fused")
    m, d, h = (333, 200, 256) if fused else (77, 40, 24)
    sizes = (110, 0, 80, 120) if fused else (20, 0, 17, 17)
    inputs = _inputs(zlib.crc32(implementation.encode()), m, d, h, sizes, dtype)
    _check(functools.partial(swiglu_ffn, implementation=implementation, interpret=interpret,
                             **kw), inputs, F32_TOL if dtype == jnp.float32 else BF16_TOL)


def test_fused_vjp_composes_its_kernels():
    """The fused path's custom VJP (interleaved weights, the SwiGLU's
    gradient in place of dh, the weight gradient split back) with reference
    kernels of the same contracts."""
    block = 8

    def gate_up(lhs, w, sizes):
        projections = gmm_reference(lhs, w, sizes)
        return projections, sw.swiglu(*sw.deinterleave(projections, block)).astype(lhs.dtype)

    def grad(dout, w_down_t, projections, sizes):
        return sw.swiglu_grad(projections, gmm_reference(dout, w_down_t, sizes), block)

    kernels = sw.Kernels(gate_up=gate_up, down=gmm_reference, grad=grad,
                         dlhs=functools.partial(gmm_reference, transpose_rhs=True),
                         tgmm=tgmm_reference, block=block)
    inputs = _inputs(3, 61, 24, 3 * block, (10, 30, 0, 13), jnp.float32)
    _check(lambda *a: sw._fused(*a, kernels), inputs, F32_TOL)


def test_interleave_round_trip():
    gate, up = jnp.arange(24.0).reshape(2, 12), -jnp.arange(24.0).reshape(2, 12)
    mixed = sw.interleave(gate, up, 4)
    assert mixed[0, :8].tolist() == [0, 1, 2, 3, 0, -1, -2, -3]
    back = sw.deinterleave(mixed, 4)
    assert (back[0] == gate).all() and (back[1] == up).all()


# In the interpreter: 128-row tiles whose groups end inside a warpgroup's
# rows, an empty group and 30 rows in no group.
INTERPRETED_SIZES, INTERPRETED_ROWS = (100, 0, 90, 50), 270


def test_swiglu_epilogue_in_gpu_interpreter():
    """swiglu=True: the projections and h against the reference."""
    tiling, h = (128, 128, 128), 128
    lhs, wg, wu, _, sizes, _ = _inputs(5, INTERPRETED_ROWS, 256, h, INTERPRETED_SIZES,
                                       jnp.bfloat16)
    w = sw.interleave(wg, wu, tiling[2] // 2)
    projections, out = two_consumers.gmm(lhs, w, sizes, out_dtype=jnp.bfloat16, tiling=tiling,
                                         interpret=True, swiglu=True)
    assert _relerr(projections, gmm_reference(lhs, w, sizes)) < 1e-2
    want = sw.swiglu(gmm_reference(lhs, wg, sizes), gmm_reference(lhs, wu, sizes))
    assert _relerr(out, want) < BF16_TOL
    assert not np.asarray(out[int(sizes.sum()):], np.float32).any()


def test_swiglu_gradient_epilogue_in_gpu_interpreter():
    """gate_up=...: the SwiGLU's gradient from the product dh, against
    swiglu_grad of the reference dh; zero in rows of no group."""
    tiling, h = (128, 64, 64), 128
    dout, w_down_t, _, _, sizes, _ = _inputs(6, INTERPRETED_ROWS, 192, h, INTERPRETED_SIZES,
                                             jnp.bfloat16)
    rows = int(sizes.sum())
    projections = jnp.asarray(np.random.default_rng(7).standard_normal(
        (INTERPRETED_ROWS, 2 * h)), jnp.bfloat16)
    projections = jnp.where(jnp.arange(INTERPRETED_ROWS)[:, None] < rows, projections, 0)
    got = two_consumers.gmm(dout, w_down_t, sizes, out_dtype=jnp.bfloat16, tiling=tiling,
                            interpret=True, gate_up=projections)
    want = sw.swiglu_grad(projections, gmm_reference(dout, w_down_t, sizes), tiling[2])
    assert got.shape == projections.shape and _relerr(got, want) < BF16_TOL
    assert not np.asarray(got[rows:], np.float32).any()


@pytest.mark.parametrize("epilogue,k,n,tiling", [
    ("swiglu", 1024, 1280, two_consumers.DEFAULT_TILING),
    ("swiglu", 1024, 1280, (128, 64, 128)),
    ("gate_up", 1024, 640, (128, 64, 128)),
])
def test_swiglu_kernels_lower_for_cuda(epilogue, k, n, tiling):
    """At moe_1b's shapes (gate+up K=1024, 2H=1280; the down projection's
    d-input K=1024, H=640) the ring and staging tiles fit the block's shared
    memory."""
    m, g = 1000, 8
    operands = [jnp.ones((m, k), jnp.bfloat16), jnp.ones((g, k, n), jnp.bfloat16),
                jnp.full((g,), m // g, jnp.int32)]
    if epilogue == "swiglu":
        fn = functools.partial(two_consumers.gmm, swiglu=True)
    else:
        operands.append(jnp.ones((m, 2 * n), jnp.bfloat16))
        fn = lambda a, b, s, p, **kw: two_consumers.gmm(a, b, s, gate_up=p, **kw)
    fn = functools.partial(fn, out_dtype=jnp.bfloat16, tiling=tiling)
    assert "mosaic_gpu" in jax.jit(fn).trace(*operands).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kw,match", [
    (dict(implementation="xla", fused=True), "fused=True cannot be honoured.*'xla'"),
    (dict(implementation="xla", fused=1), "fused must be a bool"),
])
def test_rejects_what_it_cannot_do(kw, match):
    *args, sizes, _ = _inputs(0, 16, 8, 4, (8, 8), jnp.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        swiglu_ffn(*args, sizes, **kw)


def test_rejects_mismatched_weights():
    lhs, wg, wu, wd, sizes, _ = _inputs(0, 16, 8, 4, (8, 8), jnp.float32)
    with pytest.raises(ValueError, match="w_gate and w_up must both be"):
        swiglu_ffn(lhs, wg, wu[:, :, :3], wd, sizes)
    with pytest.raises(ValueError, match=r"w_down must be \[G, H, D\]"):
        swiglu_ffn(lhs, wg, wu, wd[:, :3], sizes)
