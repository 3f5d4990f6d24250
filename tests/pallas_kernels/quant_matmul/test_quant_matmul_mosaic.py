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
    with pytest.raises(ValueError, match="cluster=2 must divide the 3 tiles of x's block"):
        int4_mosaic_gpu.int4_weight_only_mosaic(jnp.ones((20, 128), jnp.bfloat16),
                                                pack_int4(jnp.zeros((128, 256), jnp.int32)),
                                                jnp.ones((2, 256)), group_size=64, cluster=2)
    if not HAS_GPU:
        with pytest.raises(ValueError, match="needs a Hopper .* device is 'cpu'"):
            w8a8_matmul(xq, xs, wq, ws, implementation="mosaic_gpu")
