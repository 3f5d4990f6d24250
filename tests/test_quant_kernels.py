"""Quantised matmul kernels against their jnp references (interpret mode on
CPU, compiled on GPU), int4 packing, and the kernels' error paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kernel_modes

from pallas_kernels.quant_matmul import (
    dequantize_int4,
    fp8_blockwise_matmul,
    fp8_blockwise_reference,
    int4_weight_only_matmul,
    pack_int4,
    unpack_int4,
    w8a8_matmul,
    w8a8_reference,
)
from pallas_kernels.quant_matmul.packing import unpack_nibbles_float


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def int8_codes(key, shape):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)


def scales(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, 0.01, 0.1)


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("M,K,N,seed", [(37, 200, 72, 0), (16, 64, 16, 1)])
def test_w8a8_matches_reference(interpret, M, K, N, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    xq, wq = int8_codes(k[0], (M, K)), int8_codes(k[1], (N, K))
    xs, ws = scales(k[2], (M,)), scales(k[3], (N,))
    got = w8a8_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, implementation="pallas",
                      interpret=interpret, block_sizes=(32, 32, 64))
    want = w8a8_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
    # int32 accumulation is exact; only the two scale multiplies round
    assert rel_err(got, want) < 1e-6
    exact = (np.asarray(xq, np.float64) @ np.asarray(wq, np.float64).T) \
        * np.asarray(xs)[:, None] * np.asarray(ws)[None, :]
    assert rel_err(want, exact) < 1e-6


@pytest.mark.parametrize("interpret", kernel_modes())
def test_w8a8_batched_bf16_output(interpret):
    k = jax.random.split(jax.random.key(2), 4)
    xq, wq = int8_codes(k[0], (2, 9, 96)), int8_codes(k[1], (40, 96))
    xs, ws = scales(k[2], (2, 9)), scales(k[3], (40,))
    got = w8a8_matmul(xq, xs, wq, ws, implementation="pallas", interpret=interpret)
    want = w8a8_matmul(xq, xs, wq, ws, implementation="xla")
    assert got.shape == (2, 9, 40) and got.dtype == jnp.bfloat16
    assert rel_err(got, want) < 1e-2


def fp8_operands(seed, M, K, N):
    k = jax.random.split(jax.random.key(seed), 4)
    nk, nn = -(-K // 128), -(-N // 128)
    xq = (jax.random.normal(k[0], (M, K)) * 60).astype(jnp.float8_e4m3fn)
    wq = (jax.random.normal(k[1], (N, K)) * 60).astype(jnp.float8_e4m3fn)
    return xq, scales(k[2], (M, nk)), wq, scales(k[3], (nn, nk))


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("M,K,N,seed", [(37, 300, 200, 3), (16, 256, 64, 4)])
def test_fp8_blockwise_matches_reference(interpret, M, K, N, seed):
    xq, xs, wq, ws = fp8_operands(seed, M, K, N)
    got = fp8_blockwise_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, implementation="pallas",
                               interpret=interpret, block_sizes=(16, 64))
    want = fp8_blockwise_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
    assert rel_err(got, want) < 1e-5
    # the reference is the product of the dequantised operands
    x = np.asarray(xq, np.float64) * np.repeat(np.asarray(xs), 128, axis=1)[:, :K]
    w = np.asarray(wq, np.float64) * np.repeat(np.repeat(np.asarray(ws), 128, 0), 128, 1)[:N, :K]
    assert rel_err(want, x @ w.T) < 1e-6


def int4_operands(seed, K, N, g, asymmetric):
    k = jax.random.split(jax.random.key(seed), 3)
    lo, hi = (0, 16) if asymmetric else (-8, 8)
    codes = jax.random.randint(k[0], (K, N), lo, hi, jnp.int32)
    zeros = jax.random.randint(k[2], (K // g, N), 0, 16).astype(jnp.float32) if asymmetric \
        else None
    return pack_int4(codes), scales(k[1], (K // g, N)), zeros


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("M,asymmetric,split_k,dtype", [
    (1, False, 2, jnp.float32), (5, True, 4, jnp.float32), (3, False, 1, jnp.float16),
    (7, True, 1, jnp.bfloat16)])
def test_int4_weight_only_forward_and_grad(interpret, M, asymmetric, split_k, dtype):
    K, N, g = 256, 72, 32
    packed, s, z = int4_operands(10 + M, K, N, g, asymmetric)
    x = jax.random.normal(jax.random.key(20 + M), (M, K)).astype(dtype)
    # 16-bit x: y and dx are rounded to x's dtype, and dx = cos(y) @ w^T also
    # carries y's rounding
    tol = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}[dtype]
    w = dequantize_int4(packed, s, z, group_size=g)

    def loss(x, impl):
        y = int4_weight_only_matmul(x, packed, s, z, group_size=g, implementation=impl,
                                    interpret=interpret, split_k=split_k, block_n=32)
        return jnp.sum(jnp.sin(y)), y

    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(x, "pallas")
    (_, want), g_want = jax.value_and_grad(lambda x: (jnp.sum(jnp.sin(x @ w)), x @ w),
                                           has_aux=True)(x.astype(jnp.float32))
    assert got.dtype == dtype and g_got.dtype == dtype
    assert rel_err(got, want) < tol
    assert rel_err(g_got, g_want) < tol


@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trip(signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = jax.random.randint(jax.random.key(5), (38, 7), lo, hi, jnp.int32)
    packed = pack_int4(codes)
    assert packed.shape == (7, 19) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_int4(packed, signed=signed), codes)
    # layout: byte [n, i] holds k = 2i in its low nibble and k = 2i + 1 in its high one
    np.testing.assert_array_equal(np.asarray(packed) & 15, np.asarray(codes[0::2]).T & 15)
    np.testing.assert_array_equal(np.asarray(packed) >> 4, np.asarray(codes[1::2]).T & 15)
    if signed:  # the same bytes as int4 W^T, as the Mosaic GPU kernel reads them
        as_int4 = jax.lax.bitcast_convert_type(packed, jnp.int4).reshape(7, 38)
        np.testing.assert_array_equal(np.asarray(as_int4, np.int32), np.asarray(codes).T)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("signed", [True, False])
def test_unpack_nibbles_float_is_exact(dtype, signed):
    every_byte = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8).reshape(2, 128)
    lo, hi = unpack_nibbles_float(every_byte, dtype, signed=signed)
    assert lo.dtype == dtype and hi.dtype == dtype
    codes = np.asarray(unpack_int4(every_byte, signed=signed), np.float32)  # [256, 2]
    np.testing.assert_array_equal(np.asarray(lo, np.float32), codes[0::2].T)
    np.testing.assert_array_equal(np.asarray(hi, np.float32), codes[1::2].T)


def test_error_paths():
    k = jax.random.split(jax.random.key(6), 4)
    xq, wq = int8_codes(k[0], (8, 64)), int8_codes(k[1], (16, 64))
    xs, ws = scales(k[2], (8,)), scales(k[3], (16,))
    with pytest.raises(ValueError, match="xq has dtype float16"):
        w8a8_matmul(xq.astype(jnp.float16), xs, wq, ws)
    with pytest.raises(ValueError, match="shapes do not match"):
        w8a8_matmul(xq, xs, wq, scales(k[3], (15,)))
    with pytest.raises(ValueError, match="unknown quantized matmul implementation 'triton'"):
        w8a8_matmul(xq, xs, wq, ws, implementation="triton")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            w8a8_matmul(xq, xs, wq, ws, implementation="pallas", interpret=False)
    fx, fxs, fw, fws = fp8_operands(7, 8, 128, 16)
    with pytest.raises(ValueError, match="wq has dtype float8_e5m2"):
        fp8_blockwise_matmul(fx, fxs, fw.astype(jnp.float8_e5m2), fws)
    with pytest.raises(ValueError, match="fp8 blockwise shapes do not match"):
        fp8_blockwise_matmul(fx, fxs[:, :0], fw, fws)
    packed, s, _ = int4_operands(8, 64, 16, 16, False)
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="packed has dtype int8"):
        int4_weight_only_matmul(x, packed.astype(jnp.int8), s, group_size=16)
    with pytest.raises(ValueError, match="x has dtype int32"):
        int4_weight_only_matmul(x.astype(jnp.int32), packed, s, group_size=16)
    with pytest.raises(ValueError, match="group_size=24 must divide K=64"):
        int4_weight_only_matmul(x, packed, s, group_size=24)
    with pytest.raises(ValueError, match="group_size // 2=8 must be a power of two >= 16"):
        int4_weight_only_matmul(x, packed, s, group_size=16, implementation="pallas",
                                interpret=True)
    with pytest.raises(ValueError, match="even K"):
        pack_int4(jnp.ones((5, 3), jnp.int32))
    with pytest.raises(ValueError, match="takes bfloat16, float16 or float32, got int8"):
        unpack_nibbles_float(packed, jnp.int8, signed=True)
