"""The Hopper (Mosaic GPU) quantised matmuls: w8a8 int8, fp8 blockwise and
int4 weight-only.

The kernels run the shared case tables (quant_matmul_cases.py) where their
dispatch entries accept a case: compiled on a Hopper GPU (marked ``gpu``)
against the float64 product. On CPU the kernels cannot run: jax 0.10's
Mosaic GPU interpreter rejects the transposed (K-major) weight operand that
8-bit wgmma needs. There the same cases lower each kernel for CUDA instead
(Pallas -> Mosaic GPU, which checks operand types, swizzles, layouts and
shared-memory transforms), and the raster order, tiling checks and dispatch
errors are tested directly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_GPU
from quant_matmul_cases import (MOSAIC_RUNS, api_run, check, mosaic_kernel, params,
                                scaled_operands)

from pallas_kernels import compat
from pallas_kernels.quant_matmul import (
    int4_mosaic_gpu,
    int4_weight_only_matmul,
    mosaic_gpu,
    pack_int4,
    w8a8_matmul,
)
from pallas_kernels.quant_matmul.mosaic_gpu import Tiling

LOWER, COMPILED = MOSAIC_RUNS


@pytest.mark.parametrize("op,name,implementation,mode", params([LOWER]))
def test_mosaic_kernel_lowers_for_cuda(op, name, implementation, mode):
    kernel, operands = mosaic_kernel(op, name)
    text = jax.jit(kernel).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("op,name,implementation,mode", params([COMPILED]))
def test_mosaic_kernel_matches_float64_product(op, name, implementation, mode):
    kernel, operands = mosaic_kernel(op, name)
    check(op, name, implementation, (kernel(*operands),))


@pytest.mark.gpu
def test_api_dispatches_to_mosaic_on_hopper():
    """'pallas' and 'auto' pick the Mosaic kernels on Hopper; int4 through
    the API (the Mosaic forward, the dequantised-weight backward)."""
    for op, impls in (("w8a8", ("mosaic_gpu", "pallas", "auto")), ("fp8", ("mosaic_gpu",)),
                      ("int4", ("mosaic_gpu", "pallas"))):
        name = "gemv" if op == "int4" else "default_tiling_f32"
        for impl in impls:
            check(op, name, "mosaic_gpu", api_run(op, name, impl, None))


@pytest.mark.parametrize("m_tiles,n_tiles,group_m", [(7, 5, 3), (1, 9, 8), (16, 3, 8), (5, 5, 1)])
def test_raster_order_visits_every_tile_once(m_tiles, n_tiles, group_m):
    t = jnp.arange(m_tiles * n_tiles)
    m, n = mosaic_gpu.tile_coords(t, m_tiles, n_tiles, group_m)
    m, n = np.asarray(m), np.asarray(n)
    assert (m >= 0).all() and (m < m_tiles).all() and (n >= 0).all() and (n < n_tiles).all()
    assert len(set(zip(m.tolist(), n.tolist()))) == m_tiles * n_tiles
    # within a full group, consecutive tiles stay inside group_m rows of tiles
    first = m[: group_m * n_tiles]
    assert first.max() - first.min() < group_m


@pytest.mark.parametrize("tiling, kind, match", [
    (Tiling(192, 128, 3), "int8", "tm=192 must be 128 or 256"),
    (Tiling(128, 96, 3), "int8", "tn=96 must be a multiple of 64"),
    (Tiling(256, 256, 2), "int8", "256 accumulator registers"),
    (Tiling(128, 192, 3), "fp8", "tn=192 must be a multiple of 128"),
    (Tiling(256, 256, 2), "fp8", "384 accumulator registers per thread; at most 192"),
    (Tiling(256, 128, 3), "fp8", "256 accumulator registers"),
    (Tiling(128, 256, 5), "int8", "bytes of shared memory"),
    (Tiling(128, 128, 1), "int8", "stages >= 2"),
])
def test_check_tiling_rejects(tiling, kind, match):
    with pytest.raises(ValueError, match=match):
        mosaic_gpu.check_tiling(tiling, kind, jnp.bfloat16)


@pytest.mark.parametrize("m, n", [(8192, 8192), (333, 200), (1, 64)])
def test_default_tilings_fit(m, n):
    for kind in ("int8", "fp8"):
        for out_dtype in mosaic_gpu.OUT_DTYPES:
            mosaic_gpu.check_tiling(mosaic_gpu.default_tiling(kind, out_dtype, m, n), kind,
                                    out_dtype)


def test_default_tiling_is_wide_only_with_work_for_every_sm():
    sms = compat.sm_count()
    # 2 tiles of 128x256 per SM: wide; one fewer M tile: 128x128
    enough = (-(-2 * sms // 16) * 128, 16 * 256)
    fewer = (enough[0] - 128, enough[1])
    for kind in ("int8", "fp8"):
        assert mosaic_gpu.default_tiling(kind, jnp.bfloat16, *enough) == mosaic_gpu.WIDE_TILING
        assert mosaic_gpu.default_tiling(kind, jnp.bfloat16, *fewer) == mosaic_gpu.SMALL_TILING
        # a float32 output's staging tile leaves the wide tile too little shared memory
        assert mosaic_gpu.default_tiling(kind, jnp.float32, *enough).tn == 128


def test_dispatch_errors():
    xq, xs, wq, ws = scaled_operands("w8a8", "one_block_f32")
    with pytest.raises(ValueError, match="out_dtype int32 is not supported"):
        mosaic_gpu.w8a8_mosaic(xq, xs, wq, ws, out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="runs compiled only"):
        w8a8_matmul(xq, xs, wq, ws, implementation="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="tiling=.* applies only to the Mosaic GPU kernel"):
        w8a8_matmul(xq, xs, wq, ws, implementation="xla", tiling=Tiling(128, 128, 3))
    with pytest.raises(ValueError, match="block_sizes=.* apply to the portable kernel"):
        w8a8_matmul(xq, xs, wq, ws, implementation="mosaic_gpu", block_sizes=(64, 64, 64))
    packed = pack_int4(jnp.zeros((128, 128), jnp.int32))
    with pytest.raises(ValueError, match="cannot run this int4 matmul: x has dtype float32"):
        int4_weight_only_matmul(jnp.ones((2, 128)), packed, jnp.ones((2, 128)), group_size=64,
                                implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="cannot run this int4 matmul: zero points"):
        int4_weight_only_matmul(jnp.ones((2, 128), jnp.bfloat16), packed, jnp.ones((2, 128)),
                                jnp.ones((2, 128)), group_size=64, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="block_n=32 must be 64, 128 or 256"):
        int4_mosaic_gpu.int4_weight_only_mosaic(jnp.ones((2, 128), jnp.bfloat16), packed,
                                                jnp.ones((2, 128)), group_size=64, block_n=32)
    with pytest.raises(ValueError, match="block_k=96 must be a multiple of 64"):
        int4_mosaic_gpu.int4_weight_only_mosaic(jnp.ones((2, 256), jnp.bfloat16),
                                                pack_int4(jnp.zeros((256, 128), jnp.int32)),
                                                jnp.ones((1, 128)), group_size=256, block_k=96)
    with pytest.raises(ValueError, match="compute_wgs=4 must be 2 or 3"):
        int4_mosaic_gpu.int4_weight_only_mosaic(jnp.ones((2, 128), jnp.bfloat16), packed,
                                                jnp.ones((2, 128)), group_size=64, compute_wgs=4)
    with pytest.raises(ValueError, match="cannot run this int4 matmul: split_k=2"):
        int4_weight_only_matmul(jnp.ones((2, 128), jnp.bfloat16), packed, jnp.ones((2, 128)),
                                group_size=64, implementation="mosaic_gpu", split_k=2)
    x2, p2, s2 = jnp.ones((2, 1024), jnp.bfloat16), pack_int4(jnp.zeros((1024, 128), jnp.int32)), \
        jnp.ones((8, 128))
    with pytest.raises(ValueError, match=r"split_k=3 must divide the 2 K steps of block_k=512"):
        int4_mosaic_gpu.int4_weight_only_mosaic(x2, p2, s2, group_size=128, split_k=3)
    with pytest.raises(ValueError, match=r"split_k=8 must be >= 1 and, times cluster=2, at most 8"):
        int4_mosaic_gpu.int4_weight_only_mosaic(x2, p2, s2, group_size=128, block_k=128,
                                                split_k=8, cluster=2)
    with pytest.raises(ValueError, match="cannot run this int4 matmul: split_k=3 must divide"):
        int4_weight_only_matmul(x2, p2, s2, group_size=128, implementation="mosaic_gpu", split_k=3)
    with pytest.raises(ValueError, match="cluster=2 must divide the 3 tiles of x's block"):
        int4_mosaic_gpu.int4_weight_only_mosaic(jnp.ones((20, 128), jnp.bfloat16),
                                                pack_int4(jnp.zeros((128, 256), jnp.int32)),
                                                jnp.ones((2, 256)), group_size=64, cluster=2)
    if not HAS_GPU:
        with pytest.raises(ValueError, match="needs a Hopper .* device is 'cpu'"):
            w8a8_matmul(xq, xs, wq, ws, implementation="mosaic_gpu")


# Llama-3-8B's decode matmuls, K x N: the MLP's up (and gate) and down
# projections, and a square one.
DECODE_SHAPES = [(4096, 14336), (14336, 4096), (8192, 8192)]


@pytest.mark.parametrize("m, k, n, sms, want", [
    (1, 14336, 4096, 132, 2),   # 64 slices: 128 blocks in one wave
    (16, 14336, 4096, 132, 2),
    (64, 14336, 4096, 132, 2),
    (16, 14336, 4096, 114, 1),  # 128 blocks would not fit 114 SMs at once
    (16, 4096, 14336, 132, 1),  # 224 slices already fill the SMs
    (16, 8192, 8192, 132, 1),
    (16, 4096, 1024, 132, 4),   # at most 4 blocks a cluster
    (64, 4096, 1024, 132, 2),   # 4 would leave shared memory for 1 pipeline slot
    (16, 11008, 4096, 132, 1),  # 43 steps of 256: no even split
])
def test_default_split_k(m, k, n, sms, want):
    assert int4_mosaic_gpu.default_split_k(m, n, k, 128, sms=sms) == want


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("k, n", DECODE_SHAPES)
def test_int4_decode_shapes_lower_at_their_defaults(k, n, m):
    """The default call at the decode shapes fits shared memory (the lowering
    checks it) with its default split and pipeline depth."""
    shapes = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
              jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
              jax.ShapeDtypeStruct((k // 128, n), jnp.float32))
    kernel = functools.partial(int4_mosaic_gpu.int4_weight_only_mosaic, group_size=128)
    text = jax.jit(kernel).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
