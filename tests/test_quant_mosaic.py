"""The Hopper (Mosaic GPU) quantised matmuls: w8a8 int8 and fp8 blockwise.

Compiled (GPU, marked ``gpu``): against the jnp references at shapes with
partial M and N tiles, K padded to the 128-byte step, and more output tiles
than SMs (so blocks walk several tiles and the ring crosses tile boundaries).

On CPU the kernels cannot run: jax 0.10's Mosaic GPU interpreter rejects the
transposed (K-major) weight operand that 8-bit wgmma needs. There the same
test bodies lower each kernel for CUDA instead (Pallas -> Mosaic GPU, which
checks operand types, swizzles, layouts and shared-memory transforms), and
the raster order, tiling checks and dispatch errors are tested directly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_GPU

from pallas_kernels import compat
from pallas_kernels.quant_matmul import (
    dequantize_int4,
    fp8_blockwise_matmul,
    fp8_blockwise_reference,
    int4_mosaic_gpu,
    int4_weight_only_matmul,
    int4_weight_only_reference,
    mosaic_gpu,
    pack_int4,
    w8a8_matmul,
    w8a8_reference,
)
from pallas_kernels.quant_matmul.mosaic_gpu import Tiling

# "lower": lower for CUDA on CPU; "compiled": run on the GPU.
MODES = [pytest.param("lower", id="lower"),
         pytest.param("compiled", id="compiled", marks=pytest.mark.gpu)]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def run_or_lower(mode, f, *args):
    """Compiled: f(*args). Lower: check f lowers for CUDA to one Mosaic GPU
    kernel call and return None."""
    if mode == "compiled":
        return f(*args)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1
    return None


def w8a8_operands(seed, M, K, N):
    k = jax.random.split(jax.random.key(seed), 4)
    xq = jax.random.randint(k[0], (M, K), -127, 128, jnp.int32).astype(jnp.int8)
    wq = jax.random.randint(k[1], (N, K), -127, 128, jnp.int32).astype(jnp.int8)
    xs = jax.random.uniform(k[2], (M,), jnp.float32, 0.01, 0.1)
    ws = jax.random.uniform(k[3], (N,), jnp.float32, 0.01, 0.1)
    return xq, xs, wq, ws


def fp8_operands(seed, M, K, N):
    k = jax.random.split(jax.random.key(seed), 4)
    nk, nn = -(-K // 128), -(-N // 128)
    xq = (jax.random.normal(k[0], (M, K)) * 60).astype(jnp.float8_e4m3fn)
    wq = (jax.random.normal(k[1], (N, K)) * 60).astype(jnp.float8_e4m3fn)
    xs = jax.random.uniform(k[2], (M, nk), jnp.float32, 0.01, 0.1)
    ws = jax.random.uniform(k[3], (nn, nk), jnp.float32, 0.01, 0.1)
    return xq, xs, wq, ws


W8A8_CASES = [  # M, K, N, out dtype, tiling (None: default, 128x128 at these sizes)
    (333, 200, 136, jnp.float32, None),
    (77, 1100, 520, jnp.bfloat16, Tiling(128, 256, 3)),
    (2100, 384, 1300, jnp.bfloat16, Tiling(128, 128, 3, 4)),  # 187 tiles > 132 SMs
    (520, 256, 264, jnp.float32, Tiling(256, 128, 2)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(W8A8_CASES)))
def test_w8a8_mosaic_matches_reference(mode, case):
    M, K, N, out_dtype, tiling = W8A8_CASES[case]
    ops = w8a8_operands(case, M, K, N)
    got = run_or_lower(mode, lambda *a: mosaic_gpu.w8a8_mosaic(*a, out_dtype=out_dtype,
                                                               tiling=tiling), *ops)
    if got is None:
        return
    want = w8a8_reference(*ops, out_dtype=jnp.float32)
    assert got.shape == (M, N) and got.dtype == out_dtype
    # int32 accumulation is exact: only the scale multiplies (and a bf16 output) round
    assert rel_err(got, want) < (1e-6 if out_dtype == jnp.float32 else 5e-3)


FP8_CASES = [  # None: the default tiling, 128x128 at these sizes
    (333, 300, 200, jnp.float32, None),
    (2100, 520, 1300, jnp.bfloat16, Tiling(128, 128, 4, 3)),
    (64, 128, 128, jnp.bfloat16, Tiling(128, 256, 3)),  # the second weight-scale block out of N
    (333, 300, 200, jnp.bfloat16, Tiling(128, 256, 3)),  # the second block partly out of N
    (2100, 520, 1300, jnp.bfloat16, Tiling(128, 256, 2, 4)),  # last tile's second block out
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(FP8_CASES)))
def test_fp8_blockwise_mosaic_matches_reference(mode, case):
    M, K, N, out_dtype, tiling = FP8_CASES[case]
    ops = fp8_operands(10 + case, M, K, N)
    got = run_or_lower(mode, lambda *a: mosaic_gpu.fp8_blockwise_mosaic(
        *a, out_dtype=out_dtype, tiling=tiling), *ops)
    if got is None:
        return
    want = fp8_blockwise_reference(*ops, out_dtype=jnp.float32)
    assert got.shape == (M, N) and got.dtype == out_dtype
    # fp8 products are exact, but Hopper's fp8 wgmma adds a block's 128 products
    # in a reduced-precision (about 14-bit) accumulator before the promotion:
    # about 1e-4 measured on H100 (the float32 portable kernel: 3e-5)
    assert rel_err(got, want) < (5e-4 if out_dtype == jnp.float32 else 5e-3)


INT4_CASES = [  # M, K, N, group, kernel options (x is bfloat16: the kernel's only dtype)
    (1, 1024, 384, 128, {}),
    (3, 768, 320, 128, {}),  # default step: 256 codes (768 % 512 != 0)
    (5, 512, 256, 64, dict(block_n=256, block_k=256)),  # 4 groups a step
    (16, 2048, 1152, 128, dict(block_k=128, stages=3)),
    (37, 768, 640, 128, {}),  # ragged batch over 8 rows: x padded
    (64, 768, 192, 128, dict(compute_wgs=3)),  # 3 steps, one per warpgroup
    (8, 512, 192, 128, dict(block_n=64, block_k=64)),  # 2 steps a group
    (4, 2048, 128, 128, dict(block_k=1024, stages=2)),  # 8 groups a step
    (2, 1536, 384, 128, dict(stages=4)),  # 3 steps: warpgroup 0 takes two
    (11, 1024, 192, 64, dict(compute_wgs=3, block_k=128, stages=5)),
    (9, 2560, 256, 128, dict(compute_wgs=2, block_n=128)),  # 5 steps over 2 warpgroups
    # x multicast to the blocks of a cluster
    (3, 1024, 512, 128, dict(cluster=2, compute_wgs=3)),
    (16, 1536, 256, 128, dict(cluster=2, block_k=256, stages=3)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(INT4_CASES)))
def test_int4_mosaic_matches_reference(mode, case):
    M, K, N, g, opts = INT4_CASES[case]
    k = jax.random.split(jax.random.key(40 + case), 3)
    packed = pack_int4(jax.random.randint(k[0], (K, N), -8, 8, jnp.int32))
    s = jax.random.uniform(k[1], (K // g, N), jnp.float32, 0.001, 0.01)
    x = jax.random.normal(k[2], (M, K), jnp.float32).astype(jnp.bfloat16)
    got = run_or_lower(mode, lambda x, p, s: int4_mosaic_gpu.int4_weight_only_mosaic(
        x, p, s, group_size=g, **opts), x, packed, s)
    if got is None:
        return
    want = int4_weight_only_reference(x, packed, s, group_size=g, out_dtype=jnp.float32)
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    # weights are dequantised to bf16 before the tensor-core product
    assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
def test_api_dispatches_to_mosaic_on_hopper():
    xq, xs, wq, ws = w8a8_operands(20, 2 * 45, 256, 136)
    xq, xs = xq.reshape(2, 45, 256), xs.reshape(2, 45)
    want = w8a8_matmul(xq, xs, wq, ws, implementation="xla", out_dtype=jnp.float32)
    for impl in ("mosaic_gpu", "pallas", "auto"):
        got = w8a8_matmul(xq, xs, wq, ws, implementation=impl, out_dtype=jnp.float32)
        assert got.shape == (2, 45, 136) and rel_err(got, want) < 1e-6
    fx, fxs, fw, fws = fp8_operands(21, 45, 384, 200)
    want = fp8_blockwise_matmul(fx, fxs, fw, fws, implementation="xla", out_dtype=jnp.float32)
    got = fp8_blockwise_matmul(fx, fxs, fw, fws, implementation="mosaic_gpu",
                               out_dtype=jnp.float32, tiling=Tiling(128, 128, 3))
    assert rel_err(got, want) < 5e-4
    # int4 through the API (Mosaic or portable forward, dequantised-weight
    # backward)
    packed = pack_int4(jax.random.randint(jax.random.key(22), (512, 256), -8, 8, jnp.int32))
    s = jax.random.uniform(jax.random.key(23), (4, 256), jnp.float32, 0.001, 0.01)
    x = jax.random.normal(jax.random.key(24), (3, 512), jnp.float32).astype(jnp.bfloat16)
    w = dequantize_int4(packed, s, group_size=128)

    def loss(x, impl):
        y = int4_weight_only_matmul(x, packed, s, group_size=128, implementation=impl)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
    want = x.astype(jnp.float32) @ w
    g_want = jax.grad(lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32) @ w)))(x)
    for impl in ("mosaic_gpu", "pallas"):
        (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(x, impl)
        assert rel_err(got, want) < 1e-2 and rel_err(g_got, g_want) < 1e-2


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
    xq, xs, wq, ws = w8a8_operands(30, 8, 128, 64)
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
