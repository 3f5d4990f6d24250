"""Every format's quantise/dequantise against an independent NumPy reference,
bit for bit. ml_dtypes' casts (round-to-nearest-even) are the oracle for the
element types; scales are recomputed here from the OCP MX and NVFP4 recipes."""
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxkit.quant import FORMATS, dequantize, get_format, quantize
from jaxkit.quant.core import ungroup
from jaxkit.quant.formats import E2M1, E2M3, E3M2, E4M3, E5M2
from jaxkit.quant.numerics import round_to_element

F32 = np.float32
E4M3_DT = ml_dtypes.float8_e4m3fn

# name: (element, element parameter, block size, scale type); written out here
# rather than read from jaxkit so that a wrong table entry fails the test.
SPEC = {
    "int8": ("int", (-127, 127), None, "fp32"),
    "int8_asym": ("uint", (0, 255), None, "fp32"),
    "int4": ("int", (-7, 7), None, "fp32"),
    "int4_asym": ("uint", (0, 15), None, "fp32"),
    "fp8_e4m3": ("float", ml_dtypes.float8_e4m3fn, None, "fp32"),
    "fp8_e5m2": ("float", ml_dtypes.float8_e5m2, None, "fp32"),
    "mxfp8": ("float", ml_dtypes.float8_e4m3fn, 32, "e8m0"),
    "mxfp8_e5m2": ("float", ml_dtypes.float8_e5m2, 32, "e8m0"),
    "mxint8": ("mxint", None, 32, "e8m0"),
    "mxfp6_e2m3": ("float", ml_dtypes.float6_e2m3fn, 32, "e8m0"),
    "mxfp6_e3m2": ("float", ml_dtypes.float6_e3m2fn, 32, "e8m0"),
    "mxfp4": ("float", ml_dtypes.float4_e2m1fn, 32, "e8m0"),
    "nvfp4": ("float", ml_dtypes.float4_e2m1fn, 16, "e4m3"),
    "nvint4": ("int", (-7, 7), 16, "e4m3"),
}


def np_element(v, kind, param):
    """Round float32 v to the element grid: RNE with saturation."""
    if kind == "float":
        fmax = F32(ml_dtypes.finfo(param).max)
        return np.clip(v, -fmax, fmax).astype(param).astype(F32)
    if kind == "mxint":  # 8-bit two's complement with 6 fraction bits, symmetric range
        return (np.clip(np.rint(v * F32(64)), -127, 127) / F32(64)).astype(F32)
    lo, hi = param
    return np.clip(np.rint(v), lo, hi).astype(F32)


def element_max(kind, param):
    if kind == "float":
        return F32(ml_dtypes.finfo(param).max)
    if kind == "mxint":
        return F32(127 / 64)
    return F32(param[1])


def np_quantize(x, name, axis, granularity, block):
    """(dequantised, codes, scale) in grouped layout [..., G, B]. Divisions
    by a constant c or a per-group scale s are multiplications by the float32
    reciprocal (1 / c, 1 / s), the arithmetic jaxkit.quant specifies."""
    kind, param, fixed_block, scale_type = SPEC[name]
    xt = np.moveaxis(np.asarray(x, F32), axis, -1)
    n = xt.shape[-1]
    block = fixed_block or block
    if granularity == "block" or fixed_block:
        xg = xt.reshape(*xt.shape[:-1], n // block, block)
    else:
        xg = xt.reshape(*xt.shape[:-1], 1, n)
    red = tuple(range(xg.ndim)) if granularity == "tensor" else (-1,)
    if kind == "uint":
        qmin, qmax = param
        lo = np.minimum(xg.min(axis=red, keepdims=True), F32(0))
        hi = np.maximum(xg.max(axis=red, keepdims=True), F32(0))
        scale = ((hi - lo) * F32(1 / (qmax - qmin))).astype(F32)
        scale[scale == 0] = 1
        zero = np.clip(np.rint(-lo / scale), qmin, qmax).astype(F32)
        codes = np.clip(np.rint(xg * (F32(1) / scale)) + zero, qmin, qmax).astype(F32)
        return (codes - zero) * scale, codes, scale
    amax = np.abs(xg).max(axis=red, keepdims=True)
    emax_value = element_max(kind, param)
    if scale_type == "fp32":
        scale = (amax * F32(1 / emax_value)).astype(F32)
        scale[scale == 0] = 1
        codes = np_element(xg * (F32(1) / scale), kind, param)
        return codes * scale, codes, scale
    if scale_type == "e8m0":
        emax = 0 if kind == "mxint" else math.floor(math.log2(emax_value))
        exp = np.floor(np.log2(np.where(amax > 0, amax, 1).astype(np.float64))) - emax
        exp = np.where(amax > 0, np.clip(exp, -126, 127), 0)  # zero blocks: scale 1
        scale = np.ldexp(F32(1), exp.astype(np.int32)).astype(F32)
        codes = np_element(xg * (F32(1) / scale), kind, param)
        return (codes * scale).astype(F32), codes, scale
    # NVFP4 recipe: fp32 tensor scale, e4m3 block scales
    ts = F32(np.abs(xg).max() * F32(1 / (float(emax_value) * 448)))
    bs = (amax * F32(1 / float(emax_value)) * (F32(1) / ts)).astype(F32)
    bs = bs.astype(E4M3_DT).astype(F32)
    denom = bs * ts
    inv = F32(1) / np.where(denom > 0, denom, 1).astype(F32)
    codes = np.where(denom > 0, np_element(xg * inv, kind, param), 0)
    return (codes * denom).astype(F32), codes.astype(F32), bs


def wide_range_data(seed, shape):
    """Normal values spread over many binades, plus an all-zero row and column
    (all-zero groups along either axis)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = np.asarray(jax.random.normal(k1, shape) * jnp.exp(1.5 * jax.random.normal(k2, shape)))
    x = x.copy()
    x[0] = 0.0
    x[:, 0] = 0.0
    return x.astype(F32)


CASES = [(name, g, b) for name in ("int8", "int8_asym", "int4", "int4_asym", "fp8_e4m3", "fp8_e5m2")
         for g, b in (("tensor", None), ("channel", None), ("block", 16))] + \
        [(name, None, None) for name in ("mxfp8", "mxfp8_e5m2", "mxint8", "mxfp6_e2m3",
                                         "mxfp6_e3m2", "mxfp4", "nvfp4", "nvint4")]


@pytest.mark.parametrize("name,granularity,block", CASES)
@pytest.mark.parametrize("axis", [0, -1])
def test_quantize_matches_numpy_bit_exact(name, granularity, block, axis):
    x = wide_range_data(len(name) + 10 * (axis + 1), (64, 96))
    q = quantize(jnp.asarray(x), name, axis=axis, granularity=granularity, block_size=block)
    deq_ref, codes_ref, scale_ref = np_quantize(x, name, axis, granularity, block)
    np.testing.assert_array_equal(np.asarray(q.codes), codes_ref)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(q.scale), scale_ref.shape), scale_ref)
    got = np.asarray(dequantize(q))
    np.testing.assert_array_equal(np.moveaxis(got, axis, -1).reshape(deq_ref.shape), deq_ref)
    assert got.shape == x.shape


def test_every_registered_format_is_covered():
    assert set(FORMATS) == set(SPEC)


@pytest.mark.parametrize("element,dtype", [(E4M3, ml_dtypes.float8_e4m3fn),
                                           (E5M2, ml_dtypes.float8_e5m2),
                                           (E2M3, ml_dtypes.float6_e2m3fn),
                                           (E3M2, ml_dtypes.float6_e3m2fn),
                                           (E2M1, ml_dtypes.float4_e2m1fn)])
def test_element_rounding_ties_subnormals_saturation(element, dtype):
    fmax = F32(ml_dtypes.finfo(dtype).max)
    sweep = np.linspace(-1.3 * fmax, 1.3 * fmax, 20001, dtype=F32)
    grid = np.unique(sweep.astype(dtype).astype(F32))
    grid = grid[np.isfinite(grid)]
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: must round to the even neighbour
    tiny = np.ldexp(F32(1), element.min_exp - element.mbits) * np.arange(-9, 10, dtype=F32) / 4
    v = np.concatenate([sweep, grid, mids, mids * F32(1 + 2 ** -20), mids * F32(1 - 2 ** -20),
                        tiny, [2 * fmax, -3 * fmax]]).astype(F32)
    want = np.clip(v, -fmax, fmax).astype(dtype).astype(F32)
    np.testing.assert_array_equal(np.asarray(round_to_element(jnp.asarray(v), element)), want)
    assert element.max == fmax


@pytest.mark.parametrize("name", ["mxfp8", "mxfp8_e5m2", "mxint8", "mxfp6_e2m3", "mxfp6_e3m2",
                                  "mxfp4"])
def test_e8m0_scale_is_floor_log2_amax_minus_emax(name):
    x = wide_range_data(7, (4, 64))
    q = quantize(jnp.asarray(x), name)
    amax = np.abs(x.reshape(4, 2, 32)).max(-1)
    emax_elem = {"mxfp8": 8, "mxfp8_e5m2": 15, "mxint8": 0, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4,
                 "mxfp4": 2}[name]  # OCP MX v1.0, table of element formats
    nz = amax > 0
    want_exp = np.floor(np.log2(amax[nz])) - emax_elem
    bits = np.asarray(q.scale)[..., 0][nz].astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    np.testing.assert_array_equal(bits.astype(int), want_exp.astype(int) + 127)
    assert get_format(name).element.emax == emax_elem


def test_nvfp4_tensor_and_block_scales():
    x = wide_range_data(3, (8, 48))
    q = quantize(jnp.asarray(x), "nvfp4")
    ts = float(q.tensor_scale)
    assert ts == pytest.approx(np.abs(x).max() / (6 * 448), rel=1e-7)
    bs = np.asarray(q.scale)
    np.testing.assert_array_equal(bs.astype(E4M3_DT).astype(F32), bs)  # E4M3 values
    assert bs.max() <= 448


def test_unknown_format_names_valid_ones_with_hint():
    with pytest.raises(ValueError, match=r"'mxfp5'.*did you mean 'mxfp[468]'.*valid formats: int8"):
        get_format("mxfp5")
    with pytest.raises(ValueError, match="unknown quantization format 'bogus'"):
        quantize(jnp.ones((4, 32)), "bogus")


def test_granularity_errors():
    x = jnp.ones((4, 48))
    with pytest.raises(ValueError, match="block size 32 does not divide.*48"):
        quantize(x, "int8", granularity="block", block_size=32)
    with pytest.raises(ValueError, match="fixed 32-element blocks"):
        quantize(x, "mxfp4", granularity="channel")
    with pytest.raises(ValueError, match="does not divide"):
        quantize(x, "mxfp4")  # 48 is not a multiple of 32
    with pytest.raises(ValueError, match="uses blocks of 16, got block_size=32"):
        quantize(x, "nvfp4", granularity="block", block_size=32)
    with pytest.raises(ValueError, match="needs a positive block_size"):
        quantize(x, "int4", granularity="block")
    with pytest.raises(ValueError, match="only used with granularity 'block'"):
        quantize(x, "int4", granularity="channel", block_size=16)
    with pytest.raises(ValueError, match="unknown granularity 'row'"):
        quantize(x, "int4", granularity="row")
    with pytest.raises(ValueError, match="floating-point"):
        quantize(jnp.ones((4, 48), jnp.int32), "int8")
    with pytest.raises(ValueError, match="unknown scale_method"):
        quantize(x, "int8", scale_method="max")


def test_ungroup_restores_codes_layout():
    x = wide_range_data(11, (5, 3, 64))
    q = quantize(jnp.asarray(x), "int4", axis=1, granularity="channel")
    codes = np.asarray(ungroup(q, q.codes))
    scale = np.asarray(ungroup(q, q.scale))
    np.testing.assert_array_equal(codes * scale, np.asarray(dequantize(q)))
    assert codes.shape == x.shape and np.all(np.abs(codes) <= 7)
