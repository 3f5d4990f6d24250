"""Hadamard rotation, SmoothQuant, straight-through gradients, gradient
quantisation and the scale-search methods."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.quant import (
    dequantize,
    fake_quant,
    fwht,
    hadamard_block_size,
    quantize,
    quantize_gradient,
    random_signs,
    rotate_activation,
    rotate_weight,
    smooth,
    smoothing_factors,
    snr_db,
)
from jaxkit.quant.core import (
    _dequant_groups,
    _encode,
    _to_groups,
    clip_range,
    resolve_grouping,
)
from jaxkit.quant.formats import get_format


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_fwht_is_the_sylvester_hadamard_matrix():
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 32)))
    np.testing.assert_allclose(fwht(jnp.asarray(x)), x @ sylvester(32), rtol=1e-5, atol=1e-5)
    blocked = np.asarray(fwht(jnp.asarray(x[:, :24]), block=8))
    want = np.concatenate([x[:, i:i + 8] @ sylvester(8) for i in (0, 8, 16)], axis=1)
    np.testing.assert_allclose(blocked, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,block", [(768, 256), (96, 32), (1024, 1024)])
def test_bf16_rotation_is_the_float64_one(n, block):
    """A bf16 activation is rotated in float32 (one bf16 GEMM up to 256-wide
    blocks, the Kronecker pair above): equal to the float64 transform of the
    same values, and so is its gradient."""
    assert hadamard_block_size(n) == block
    k = jax.random.split(jax.random.key(n), 3)
    signs = random_signs(k[0], n)
    x = jax.random.normal(k[1], (3, 5, n)).astype(jnp.bfloat16)
    ct = jax.random.normal(k[2], (3, 5, n)).astype(jnp.bfloat16).astype(jnp.float32)
    r = np.asarray(signs, np.float64)[:, None] * np.kron(np.eye(n // block), sylvester(block))
    r /= np.sqrt(block)
    y, vjp = jax.vjp(lambda x: rotate_activation(x, signs), x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ r, rtol=1e-6, atol=1e-6)
    (dx,) = vjp(ct)
    assert dx.dtype == jnp.bfloat16
    want = (np.asarray(ct, np.float64) @ r.T).astype(jnp.bfloat16).astype(np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float64), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n,block", [(64, 64), (48, 16), (96, 32)])
def test_rotation_is_orthogonal_and_preserves_products(n, block):
    assert hadamard_block_size(n) == block
    k = jax.random.split(jax.random.key(n), 3)
    signs = random_signs(k[0], n)
    r = np.asarray(rotate_activation(jnp.eye(n), signs), np.float64)  # R
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-6)  # invertible: R^-1 = R^T
    x = jax.random.normal(k[1], (5, 7, n))
    w = jax.random.normal(k[2], (n, 11))
    np.testing.assert_allclose(rotate_weight(w, signs), r.T @ np.asarray(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rotate_activation(x, signs) @ rotate_weight(w, signs), x @ w,
                               rtol=1e-4, atol=1e-4)
    # undoing the rotation recovers x
    back = rotate_activation(x, signs) @ jnp.asarray(r.T, jnp.float32)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_rotation_spreads_outliers_and_raises_snr():
    k = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(k[0], (64, 128)).at[:, 5].multiply(50.0)  # one outlier channel
    signs = random_signs(k[1], 128)
    plain = snr_db(x, dequantize(quantize(x, "int4")))
    xr = rotate_activation(x, signs)
    rotated = snr_db(xr, dequantize(quantize(xr, "int4")))
    assert rotated > plain + 3


def test_rotation_errors():
    with pytest.raises(ValueError, match="dimension 15 is odd"):
        hadamard_block_size(15)
    with pytest.raises(ValueError, match=r"signs of shape \(8,\) do not match dimension 16"):
        rotate_activation(jnp.ones((2, 16)), jnp.ones((8,)))
    with pytest.raises(ValueError, match="power of two dividing"):
        fwht(jnp.ones((2, 12)), block=8)


def test_smoothquant_preserves_products_and_follows_formula():
    k = jax.random.split(jax.random.key(2), 2)
    x = jax.random.normal(k[0], (33, 24)) * jnp.linspace(0.1, 20.0, 24)
    w = jax.random.normal(k[1], (24, 10))
    act_max = jnp.max(jnp.abs(x), axis=0)
    s = smoothing_factors(act_max, w, 0.5)
    want = np.sqrt(np.asarray(act_max)) / np.sqrt(np.abs(np.asarray(w)).max(axis=1))
    np.testing.assert_allclose(s, want, rtol=1e-5)
    xs, ws = smooth(x, w, s)
    np.testing.assert_allclose(xs @ ws, x @ w, rtol=1e-4, atol=1e-4)
    # the smoothed activations have flatter per-channel ranges
    spread = lambda a: float(jnp.max(jnp.abs(a)) / jnp.min(jnp.max(jnp.abs(a), axis=0)))
    assert spread(xs) < spread(x)
    with pytest.raises(ValueError, match="alpha must be in"):
        smoothing_factors(act_max, w, 1.5)
    with pytest.raises(ValueError, match="do not match the weight's input dimension 24"):
        smoothing_factors(act_max[:5], w, 0.5)


@pytest.mark.parametrize("fmt,method", [("int4", "percentile"), ("int4_asym", "percentile"),
                                        ("fp8_e4m3", "mse"), ("nvfp4", "mse")])
def test_straight_through_gradient_is_the_clipping_mask(fmt, method):
    x = jax.random.normal(jax.random.key(3), (8, 64)) * 3
    kw = dict(axis=-1, scale_method=method, percentile=90.0)
    grad = jax.grad(lambda x: jnp.sum(fake_quant(x, fmt, **kw) * 2.0))(x)
    q = quantize(x, fmt, **kw)
    np.testing.assert_array_equal(fake_quant(x, fmt, **kw), dequantize(q))
    lo, hi = clip_range(q)
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_array_equal(grad, jnp.where(inside, 2.0, 0.0))
    if method == "percentile":
        assert 0 < int(jnp.sum(~inside)) < x.size  # some values were clipped


def test_gradient_quantisation_quantises_the_backward_only():
    y = jax.random.normal(jax.random.key(4), (4, 32))
    cot = jax.random.normal(jax.random.key(5), (4, 32))
    out, vjp = jax.vjp(lambda y: quantize_gradient(y, "fp8_e5m2"), y)
    np.testing.assert_array_equal(out, y)
    (g,) = vjp(cot)
    np.testing.assert_array_equal(g, dequantize(quantize(cot, "fp8_e5m2", axis=-1)))
    assert not np.array_equal(np.asarray(g), np.asarray(cot))


@pytest.mark.parametrize("fmt,granularity,block,gains", [("int4", "block", 16, True),
                                                         ("int8", "tensor", None, False),
                                                         ("mxfp4", None, None, False),
                                                         ("nvint4", None, None, True),
                                                         ("int4_asym", "channel", None, True)])
def test_mse_search_never_loses_to_absmax(fmt, granularity, block, gains):
    x = jax.random.normal(jax.random.key(6), (16, 64)) ** 3  # heavy tails
    f = get_format(fmt)
    xg, red = _to_groups(x, 1, resolve_grouping(f, granularity, block))

    def group_err(method):
        q = quantize(x, fmt, granularity=granularity, block_size=block, scale_method=method)
        d = _dequant_groups(q.codes, q.scale, q.zero, q.tensor_scale)
        return np.asarray(jnp.sum(jnp.square(d - xg), axis=red))

    mse, absmax = group_err("mse"), group_err("absmax")
    assert np.all(mse <= absmax * (1 + 1e-6))
    # int4 grids gain from clipping; power-of-two MX scales and 8 bits need not
    assert (mse.sum() < absmax.sum()) == gains


def test_percentile_clips_below_absmax():
    x = jax.random.normal(jax.random.key(7), (4, 256))
    q = quantize(x, "int8", scale_method="percentile", percentile=99.0)
    amax = np.abs(np.asarray(x)).max(axis=1)
    np.testing.assert_array_less(np.asarray(q.scale)[:, 0, 0] * 127, amax)
    assert np.asarray(dequantize(q)).max() < np.asarray(x).max()
    with pytest.raises(ValueError, match="percentile must be in"):
        quantize(x, "int8", scale_method="percentile", percentile=0.0)


def test_encode_of_a_zero_group_round_trips():
    f = get_format("int4")
    c, s, z, ts = _encode(jnp.zeros((2, 1, 8)), f, jnp.zeros((2, 1, 1)), None)
    np.testing.assert_array_equal(_dequant_groups(c, s, z, ts), 0.0)
