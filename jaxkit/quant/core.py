"""Quantise, dequantise and fake-quantise arrays in any registered format.

Groups (the elements sharing one scale) always run along ``axis``, the
contraction axis of the matmul the array feeds:

* 'tensor'            one scale for the whole array;
* 'channel' / 'token' one scale per vector along ``axis``: for a weight
                      [in, out] with axis=0 that is per output channel, for an
                      activation [..., in] with axis=-1 per token;
* 'block'             blocks of ``block_size`` consecutive elements along
                      ``axis`` (MX/NV formats always use their own blocks).

Scales come from a per-group statistic chosen by ``scale_method``: 'absmax',
'percentile' (of |x|; of x for asymmetric formats) or 'mse' (the clipping
ratio of the absmax, from MSE_RATIOS, with the least squared error per group).
Scales are amax / (largest element) (computed as amax * float32(1 / largest));
scales with a zero statistic are set to 1, so all-zero groups round-trip to
zeros. E8M0 exponents are clamped to [-126, 127]: float32 holds 2**-127 only
as a subnormal, which XLA flushes to zero.

Elements round to nearest (ties to even) or, with rounding='stochastic' and a
PRNG key, stochastically (jaxkit.quant.numerics): unbiased, which low-bit
gradients need (Quartet, Castro et al. 2025). Stochastic rounding is unbiased
only where nothing saturates, so it takes absmax scales and rounds the block
scales up: the E8M0 exponent is the smallest with amax / scale <= the largest
element (the OCP rule, floor(log2 amax) - emax, lets up to 8/6 of it through
for FP4; Tseng et al. 2025 scale by 3/4 for the same end) and NV E4M3 block
scales round up instead of to nearest.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxkit.quant.formats import E4M3, Format, get_format
from jaxkit.quant.numerics import floor_log2, round_to_element

GRANULARITIES = ("tensor", "channel", "token", "block")
SCALE_METHODS = ("absmax", "percentile", "mse")
ROUNDINGS = ("nearest", "stochastic")
MSE_RATIOS = tuple(float(r) for r in np.linspace(0.2, 1.0, 33))


@dataclasses.dataclass(frozen=True)
class Grouping:
    """Resolved grouping: 'tensor', 'row' (channel/token) or 'block' of size."""
    kind: str
    block_size: int | None = None


def resolve_grouping(fmt: Format, granularity: str | None, block_size: int | None) -> Grouping:
    """Check a granularity request against a format; raise on what it cannot honour."""
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if fmt.is_block_format:
        if granularity not in (None, "block"):
            raise ValueError(f"format {fmt.name!r} has fixed {fmt.block_size}-element blocks; "
                             f"granularity {granularity!r} is not possible (use None or 'block')")
        if block_size is not None and block_size != fmt.block_size:
            raise ValueError(f"format {fmt.name!r} uses blocks of {fmt.block_size}, "
                             f"got block_size={block_size}")
        return Grouping("block", fmt.block_size)
    if granularity == "block":
        if block_size is None or block_size < 1:
            raise ValueError(f"granularity 'block' needs a positive block_size, got {block_size}")
        return Grouping("block", block_size)
    if block_size is not None:
        raise ValueError(f"block_size={block_size} is only used with granularity 'block', "
                         f"got granularity {granularity!r}")
    return Grouping("tensor" if granularity == "tensor" else "row")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QTensor:
    """A quantised array in grouped layout.

    codes: element values on the format's grid, float32 [..., G, B] (the
      quantised axis moved last and split into G groups of B); for integer
      formats the integer codes times the element step.
    scale: per-group scale [..., G, 1] (a power of two for E8M0, an E4M3
      value for NV formats, any fp32 otherwise; broadcast for 'tensor').
    zero: integer zero points [..., G, 1] (asymmetric formats) or None.
    tensor_scale: the NV formats' fp32 second-level scale or None.
    """
    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    tensor_scale: jax.Array | None
    fmt: Format = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


def _to_groups(x, axis: int, grouping: Grouping):
    xt = jnp.moveaxis(x, axis, -1)
    n = xt.shape[-1]
    if grouping.kind == "block":
        bs = grouping.block_size
        if n % bs:
            raise ValueError(f"block size {bs} does not divide the quantised dimension "
                             f"(axis {axis} of shape {tuple(x.shape)} has {n} elements)")
        xg = xt.reshape(*xt.shape[:-1], n // bs, bs)
    else:
        xg = xt.reshape(*xt.shape[:-1], 1, n)
    red = tuple(range(xg.ndim)) if grouping.kind == "tensor" else (-1,)
    return xg, red


def _from_groups(xg, axis: int, shape):
    moved = list(shape)
    moved.append(moved.pop(axis % len(shape)))
    return jnp.moveaxis(xg.reshape(moved), -1, axis)


def _recip(c: float) -> np.float32:
    """1/c as a float32 constant.

    Every division by a constant or by a per-group scale is written as a
    multiplication by the (correctly rounded) reciprocal: XLA rewrites a
    division by a broadcast value into that form anyway, so writing it out
    makes the arithmetic the same on every backend and in the NumPy spec."""
    return np.float32(1.0 / c)


def _encode(xg, fmt: Format, stat, tensor_amax, noise=None):
    """(codes, scale, zero, tensor_scale) of grouped xg for a per-group statistic:
    amax for symmetric formats, (lo, hi) for asymmetric ones; noise: uniform
    [0, 1) of xg's shape for stochastic rounding (symmetric formats), or None."""
    el = fmt.element
    rounding = "nearest" if noise is None else "stochastic"
    element = lambda v: round_to_element(v, el, rounding, noise)
    if fmt.asymmetric:
        lo, hi = stat
        scale = (hi - lo) * _recip(el.qmax - el.qmin)
        scale = jnp.where(scale > 0, scale, 1.0)
        zero = jnp.clip(jnp.round(-lo / scale), el.qmin, el.qmax)
        codes = jnp.clip(jnp.round(xg * (1.0 / scale)) + zero, el.qmin, el.qmax)
        return codes, scale, zero, None
    amax = stat
    if fmt.scale_type == "fp32":
        scale = amax * _recip(el.max)
        scale = jnp.where(scale > 0, scale, 1.0)
        return element(xg * (1.0 / scale)), scale, None, None
    if fmt.scale_type == "e8m0":
        # OCP MX: shared exponent floor(log2(amax)) - emax_elem, clamped to the
        # E8M0 range less 2**-127, which is subnormal in float32 (XLA flushes it).
        pos = amax > 0
        safe_amax = jnp.where(pos, amax, 1.0)
        x_exp = floor_log2(safe_amax) - el.emax
        if noise is not None:  # no saturation: one more where amax / scale > max
            x_exp = jnp.where(jnp.ldexp(safe_amax, -x_exp) > el.max, x_exp + 1, x_exp)
        x_exp = jnp.clip(x_exp, -126, 127)
        scale = jnp.ldexp(jnp.float32(1.0), jnp.where(pos, x_exp, 0))
        return element(xg * (1.0 / scale)), scale, None, None
    # e4m3 block scales under an fp32 tensor scale (NVFP4 recipe): the tensor
    # scale maps the tensor's amax onto the top of the E4M3 x element range.
    ts = tensor_amax * _recip(el.max * E4M3.max)
    ts = jnp.where(ts > 0, ts, 1.0)
    bs = round_to_element(amax * _recip(el.max) * (1.0 / ts), E4M3,
                          "nearest" if noise is None else "up")
    denom = bs * ts
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, element(xg * (1.0 / safe)), 0.0), bs, None, ts


def _dequant_groups(codes, scale, zero, ts):
    if zero is not None:
        codes = codes - zero
    return codes * (scale if ts is None else scale * ts)


def _clip_range(fmt: Format, scale, zero, ts):
    """Smallest and largest values the groups can represent (the STE window)."""
    el = fmt.element
    if zero is not None:
        return (el.qmin - zero) * scale, (el.qmax - zero) * scale
    hi = el.max * (scale if ts is None else scale * ts)
    return -hi, hi


def _stat(xg, red, fmt: Format, scale_method: str, percentile: float):
    if fmt.asymmetric:
        if scale_method == "percentile":
            lo = jnp.quantile(xg, 1 - percentile / 100, axis=red, keepdims=True)
            hi = jnp.quantile(xg, percentile / 100, axis=red, keepdims=True)
        else:
            lo = jnp.min(xg, axis=red, keepdims=True)
            hi = jnp.max(xg, axis=red, keepdims=True)
        return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    a = jnp.abs(xg)
    if scale_method == "percentile":
        return jnp.quantile(a, percentile / 100, axis=red, keepdims=True)
    return jnp.max(a, axis=red, keepdims=True)


def _scale_stat(stat, r):
    return tuple(s * r for s in stat) if isinstance(stat, tuple) else stat * r


def _mse_stat(xg, red, fmt, stat, tensor_amax):
    """Per group, the clipping ratio of ``stat`` minimising squared error."""
    def err(r):
        c, s, z, ts = _encode(xg, fmt, _scale_stat(stat, r), tensor_amax)
        return jnp.sum(jnp.square(_dequant_groups(c, s, z, ts) - xg), axis=red, keepdims=True)

    def step(carry, r):
        best_err, best_r = carry
        e = err(r)
        better = e < best_err
        return (jnp.where(better, e, best_err), jnp.where(better, r, best_r)), None

    first = err(1.0)
    (_, best_r), _ = jax.lax.scan(step, (first, jnp.ones_like(first)),
                                  jnp.asarray(MSE_RATIOS[:-1], jnp.float32))
    return _scale_stat(stat, best_r)


def check_rounding(fmt: Format, rounding: str, key, scale_method: str, amax=None) -> None:
    """Raise ValueError for a rounding request quantize cannot honour."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    if rounding == "nearest":
        if key is not None:
            raise ValueError("a PRNG key is only used with rounding 'stochastic'")
        return
    if key is None:
        raise ValueError("rounding 'stochastic' needs a PRNG key")
    # unbiased only without clipping: symmetric formats with absmax scales
    if fmt.asymmetric:
        raise ValueError(f"rounding 'stochastic' needs a symmetric format, got {fmt.name!r}")
    if scale_method != "absmax" or amax is not None:
        clipped = "a precomputed amax" if amax is not None else f"scale_method {scale_method!r}"
        raise ValueError(f"rounding 'stochastic' is unbiased only without clipping: it needs "
                         f"scale_method 'absmax' and no precomputed amax, got {clipped}")


def _prepare(x, fmt, axis, granularity, block_size, scale_method, percentile):
    fmt = get_format(fmt)
    if scale_method not in SCALE_METHODS:
        raise ValueError(f"unknown scale_method {scale_method!r}; choose one of {SCALE_METHODS}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise ValueError(f"quantize needs a floating-point array, got dtype {jnp.asarray(x).dtype}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs an array with at least one dimension")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for shape {tuple(x.shape)}")
    grouping = resolve_grouping(fmt, granularity, block_size)
    xg, red = _to_groups(x, axis, grouping)
    return fmt, x, grouping, xg, red


def _data_stat(xg, red, fmt, scale_method, percentile):
    """(per-group statistic, the tensor's absmax for formats with a tensor
    scale, else None)."""
    stat = _stat(xg, red, fmt, scale_method, percentile)
    tensor_amax = None
    if fmt.tensor_scale:
        # The largest group absmax is the tensor's: no second pass over xg.
        tensor_amax = jnp.max(jnp.abs(xg)) if scale_method == "percentile" else jnp.max(stat)
    if scale_method == "mse":
        stat = _mse_stat(xg, red, fmt, stat, tensor_amax)
    return stat, tensor_amax


def tensor_statistic(x, fmt: str | Format, *, scale_method: str = "absmax",
                     percentile: float = 99.9):
    """The per-tensor statistic quantize would use (amax, or (lo, hi) for
    asymmetric formats) as scalars: what calibration observes per batch."""
    fmt, _, _, xg, red = _prepare(x, fmt, -1, "tensor", None, scale_method, percentile)
    stat, _ = _data_stat(xg, red, fmt, scale_method, percentile)
    return tuple(s.reshape(()) for s in stat) if fmt.asymmetric else stat.reshape(())


_STATIC = ("fmt", "axis", "granularity", "block_size", "scale_method", "percentile", "rounding")


@functools.partial(jax.jit, static_argnames=_STATIC)
def quantize(x, fmt: str | Format, *, axis: int = -1, granularity: str | None = None,
             block_size: int | None = None, scale_method: str = "absmax",
             percentile: float = 99.9, amax=None, rounding: str = "nearest",
             key=None) -> QTensor:
    """Quantise ``x`` (computed in float32) into ``fmt``.

    amax: a precomputed (calibrated) statistic replacing the data's own:
    the absmax for symmetric formats, a (lo, hi) pair for asymmetric ones;
    only with granularity 'tensor' of a scalar format.
    rounding: 'nearest', or 'stochastic' with ``key`` (a PRNG key) drawing
    the noise (module docstring).
    """
    check_rounding(get_format(fmt), rounding, key, scale_method, amax)
    fmt, x, grouping, xg, red = _prepare(x, fmt, axis, granularity, block_size,
                                         scale_method, percentile)
    if amax is not None:
        if grouping.kind != "tensor":
            raise ValueError("a precomputed amax needs granularity 'tensor' and a scalar format, "
                             f"got {fmt.name!r} with {grouping.kind!r} groups")
        stat = tuple(jnp.asarray(a, jnp.float32) for a in amax) if fmt.asymmetric \
            else jnp.asarray(amax, jnp.float32)
        tensor_amax = jnp.max(jnp.abs(xg)) if fmt.tensor_scale else None
    else:
        stat, tensor_amax = _data_stat(xg, red, fmt, scale_method, percentile)
    noise = None if key is None else jax.random.uniform(key, xg.shape, jnp.float32)
    codes, scale, zero, ts = _encode(xg, fmt, stat, tensor_amax, noise)
    return QTensor(codes, scale, zero, ts, fmt, axis % x.ndim, tuple(x.shape))


def ungroup(q: QTensor, a) -> jax.Array:
    """An array in q's grouped layout (codes, or a per-group array such as
    q.scale, broadcast) back in the original layout of the quantised array."""
    return _from_groups(jnp.broadcast_to(a, q.codes.shape), q.axis, q.shape)


def dequantize(q: QTensor) -> jax.Array:
    """float32 array of ``q``'s original shape."""
    return _from_groups(_dequant_groups(q.codes, q.scale, q.zero, q.tensor_scale), q.axis, q.shape)


def clip_range(q: QTensor):
    """(lo, hi) arrays, broadcastable to the original shape: the values that
    quantise without clipping (the straight-through window)."""
    lo, hi = _clip_range(q.fmt, q.scale, q.zero, q.tensor_scale)
    return ungroup(q, lo), ungroup(q, hi)


@functools.partial(jax.jit, static_argnames=_STATIC)
def fake_quant(x, fmt: str | Format, *, axis: int = -1, granularity: str | None = None,
               block_size: int | None = None, scale_method: str = "absmax",
               percentile: float = 99.9, amax=None, rounding: str = "nearest", key=None):
    """Quantise-dequantise with a clipped straight-through estimator: the value
    is the dequantised array; the gradient is 1 where x lies inside the
    representable range and 0 where it was clipped. Returns x's dtype.
    Arguments as for quantize."""
    q = quantize(jax.lax.stop_gradient(x), fmt, axis=axis, granularity=granularity,
                 block_size=block_size, scale_method=scale_method, percentile=percentile,
                 amax=amax, rounding=rounding, key=key)
    deq = dequantize(q)
    lo, hi = clip_range(q)
    xf = x.astype(jnp.float32)
    inside = (xf >= lo) & (xf <= hi)
    out = deq + jnp.where(inside, xf - jax.lax.stop_gradient(xf), 0.0)
    return out.astype(x.dtype)


def snr_db(x, x_hat) -> jax.Array:
    """Signal-to-quantisation-noise ratio 10 log10(sum x^2 / sum (x - x_hat)^2)."""
    x = jnp.asarray(x, jnp.float32)
    noise = jnp.sum(jnp.square(x - jnp.asarray(x_hat, jnp.float32)))
    return 10 * jnp.log10(jnp.sum(jnp.square(x)) / noise)
