"""Storage formats of a KV cache and what each costs per token.

A cache tensor (keys or values) is [..., tokens, kv_heads, head_dim] in one
of:
  'bf16' (or any float dtype)  the values themselves;
  'int8'  QuantizedKV: int8 codes, one float32 absmax scale per token and
          head (x ~ code * scale, codes in [-127, 127]);
  'fp8'   QuantizedKV: float8_e4m3fn codes, one float32 absmax scale per
          token and head (x ~ code * scale, |code| <= 448).
  'kivi2' Kivi2Keys / Kivi2Values (KIVI, Liu et al. 2024): asymmetric 2-bit
          codes, keys per channel over groups of G tokens, values per token
          over groups of Gv channels, scale and zero point float16; the
          newest L mod G tokens (those of the group still filling) wait in a
          full-precision residual and are quantized as a group when it fills.
Quantizing an int8 or fp8 token touches no other token, so a cache engine
quantizes the new tokens and writes their codes and scales into its slots
like any other values. A KIVI-2 cache is updated only through kivi2_append,
which keeps the residual and quantizes groups as they complete.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# format -> (code dtype, largest code magnitude)
CODES = {"int8": (jnp.dtype(jnp.int8), 127.0), "fp8": (jnp.dtype(jnp.float8_e4m3fn), 448.0)}
FORMATS = tuple(CODES)
SCALE_DTYPE = jnp.dtype(jnp.float32)


class QuantizedKV(NamedTuple):
    """A quantized cache tensor (a pytree: slice, index and scatter both
    leaves alike). data [..., tokens, kv_heads, head_dim] int8 or
    float8_e4m3fn; scale [..., tokens, kv_heads] float32."""
    data: jax.Array
    scale: jax.Array

    @property
    def fmt(self) -> str:
        """'int8' or 'fp8', from the code dtype."""
        return format_of(self.data.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the values it stands for (that of data)."""
        return tuple(self.data.shape)


def format_of(code_dtype) -> str:
    """The format name of a code dtype ('int8' or 'fp8')."""
    for name, (dtype, _) in CODES.items():
        if jnp.dtype(code_dtype) == dtype:
            return name
    raise ValueError(f"no KV format has codes of dtype {code_dtype}; formats: "
                     f"{', '.join(f'{n} ({d})' for n, (d, _) in CODES.items())}")


def quantize_kv(x, fmt: str) -> QuantizedKV:
    """x [..., kv_heads, head_dim] (any float dtype) -> QuantizedKV in
    ``fmt`` ('int8' or 'fp8'): per token and head, scale = max|x| / largest
    code, codes = x / scale rounded to the nearest code (int8: to the nearest
    integer). An all-zero vector gets scale 0 and zero codes."""
    if fmt not in CODES:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 2:
        raise ValueError(f"x must be a float array [..., kv_heads, head_dim], got {x.dtype} "
                         f"{tuple(x.shape)}")
    dtype, top = CODES[fmt]
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / top
    scaled = xf / jnp.where(scale == 0, 1.0, scale)[..., None]
    if fmt == "int8":
        scaled = jnp.round(scaled)
    # Rounding x / scale may land a hair beyond the largest code; fp8 e4m3fn
    # has no infinity and would turn that into NaN.
    codes = jnp.clip(scaled, -top, top).astype(dtype)
    return QuantizedKV(codes, scale)


def dequantize_kv(qkv: QuantizedKV, dtype) -> jax.Array:
    """codes * scale in ``dtype`` (computed in float32)."""
    values = qkv.data.astype(jnp.float32) * qkv.scale.astype(jnp.float32)[..., None]
    return values.astype(dtype)


def kv_bytes_per_token(fmt: str, kv_heads: int, head_dim: int, *, group: int = 32,
                       value_group: int = 32) -> float:
    """Bytes one token takes in one layer's cache, keys and values together:
    fmt a float dtype name ('bfloat16', 'bf16', 'float16', 'float32'), a
    quantized format ('int8', 'fp8': codes plus a float32 scale per head) or
    'kivi2' (2-bit codes; a float16 scale and zero per channel per ``group``
    tokens for keys, per ``value_group`` channels per token for values). The
    KIVI residual is a fixed cost per sequence: kivi2_residual_bytes."""
    if fmt in CODES:
        per_head = head_dim * CODES[fmt][0].itemsize + SCALE_DTYPE.itemsize
    elif fmt == "kivi2":
        params = 2 * KIVI_PARAM_DTYPE.itemsize  # scale and zero
        per_head = 2 * head_dim / 4 + params * head_dim / group + params * head_dim / value_group
        return kv_heads * per_head
    else:
        per_head = head_dim * _float_dtype(fmt).itemsize
    return 2.0 * kv_heads * per_head


def _float_dtype(name: str):
    try:
        dtype = jnp.dtype({"bf16": "bfloat16"}.get(name, name))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"unknown KV format {name!r}; use a float dtype name, 'kivi2' or one "
                         f"of {FORMATS}")
    return np.dtype(dtype)


# ---------------------------------------------------------------------------
# KIVI-2.

KIVI_LEVELS = 3                        # codes 0..3
KIVI_PARAM_DTYPE = np.dtype(np.float16)  # scale and zero point
KIVI_PER_BYTE = 4                      # codes a byte holds


class _Kivi2(NamedTuple):
    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    residual: jax.Array

    @property
    def group(self) -> int:
        """G: slots a key group holds, and the residual's rows."""
        return self.residual.shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the slots' values, [N, S, Hkv, D]."""
        return (*self.codes.shape[:-1], self.codes.shape[-1] * KIVI_PER_BYTE)


class Kivi2Keys(_Kivi2):
    """Keys in KIVI-2 (a pytree). Slots as for any cache tensor (contiguous
    [B, S, ...] or a pool [P, page_size, ...]); G divides S (the page size).
      codes    [N, S, Hkv, D/4] uint8: 2-bit codes, packed planar: byte i
               holds channels i, i + D/4, i + D/2, i + 3D/4 in bits 0-1,
               2-3, 4-5, 6-7;
      scale    [N, S/G, Hkv, D] float16: per channel, per group of G slots;
      zero     [N, S/G, Hkv, D] float16 (key = code * scale + zero);
      residual [B, G, Hkv, D]: position p of the group still filling
               (p >= L - L mod G) at row p mod G, per sequence."""
    __slots__ = ()


class Kivi2Values(_Kivi2):
    """Values in KIVI-2 (a pytree); as Kivi2Keys but scale and zero are
    [N, S, Hkv, D/Gv] float16: per slot, per group of Gv channels."""
    __slots__ = ()

    @property
    def value_group(self) -> int:
        """Gv: channels a value group holds."""
        return self.codes.shape[-1] * KIVI_PER_BYTE // self.scale.shape[-1]


KIVI_TYPES = (Kivi2Keys, Kivi2Values)


def kivi2_cache(storage_shape, batch: int, *, group: int = 32, value_group: int = 32,
                residual_dtype=jnp.bfloat16) -> tuple[Kivi2Keys, Kivi2Values]:
    """An empty KIVI-2 cache: storage_shape (N, S, Hkv, D) as a plain cache
    tensor's (N = batch contiguous, or pages of S slots), ``batch`` sequences'
    residuals. group G must divide S; value_group divides D / 4 (each quarter
    of the channels, one bit plane of the packing, holds whole groups)."""
    N, S, Hkv, D = storage_shape
    if S % group or D % KIVI_PER_BYTE or (D // KIVI_PER_BYTE) % value_group:
        raise ValueError(f"KIVI-2 needs group={group} dividing S={S} and value_group="
                         f"{value_group} dividing head_dim / 4 = {D / KIVI_PER_BYTE}")
    # Separate buffers for every leaf, so that a jit may donate them all.
    def cache(cls, params_shape):
        return cls(jnp.zeros((N, S, Hkv, D // KIVI_PER_BYTE), jnp.uint8),
                   jnp.zeros(params_shape, KIVI_PARAM_DTYPE),
                   jnp.zeros(params_shape, KIVI_PARAM_DTYPE),
                   jnp.zeros((batch, group, Hkv, D), residual_dtype))
    return (cache(Kivi2Keys, (N, S // group, Hkv, D)),
            cache(Kivi2Values, (N, S, Hkv, D // value_group)))


def pack2(codes):
    """[..., D] codes 0..3 (any int dtype) -> [..., D/4] uint8, planar."""
    planes = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], KIVI_PER_BYTE, -1)
    return sum(planes[..., j, :] << (2 * j) for j in range(KIVI_PER_BYTE)).astype(jnp.uint8)


def unpack2(packed):
    """The inverse of pack2: [..., D/4] uint8 -> [..., D] uint8 codes."""
    shifts = jnp.arange(0, 2 * KIVI_PER_BYTE, 2, dtype=jnp.uint8)[:, None]
    planes = (packed[..., None, :] >> shifts) & 3
    return planes.reshape(*packed.shape[:-1], -1)


def _asymmetric(x, axis):
    """2-bit asymmetric quantization of float32 x over ``axis`` -> (codes,
    scale, zero) with scale and zero rounded to float16 first, so that
    code * scale + zero is the best reconstruction the stored values allow."""
    lo, hi = jnp.min(x, axis=axis, keepdims=True), jnp.max(x, axis=axis, keepdims=True)
    scale = ((hi - lo) / KIVI_LEVELS).astype(KIVI_PARAM_DTYPE)
    zero = lo.astype(KIVI_PARAM_DTYPE)
    s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
    codes = jnp.clip(jnp.round((x - z32) / jnp.where(s32 == 0, 1.0, s32)), 0, KIVI_LEVELS)
    return codes, scale, zero


def kivi2_dequantize(x) -> jax.Array:
    """The slots' values of a Kivi2Keys / Kivi2Values as float32 [N, S, Hkv,
    D] (the residual is not applied: reference.py does that by position)."""
    codes = unpack2(x.codes).astype(jnp.float32)
    scale, zero = x.scale.astype(jnp.float32), x.zero.astype(jnp.float32)
    if isinstance(x, Kivi2Keys):
        scale, zero = (jnp.repeat(a, x.group, axis=1) for a in (scale, zero))
    else:
        scale, zero = (jnp.repeat(a, x.value_group, axis=3) for a in (scale, zero))
    return codes * scale + zero


def _write_rows(storage, rows, start, keep, page_table):
    """storage with rows [B, n, ...] written at logical rows start..start+n
    of each sequence (contiguous, or through the page table: the n rows lie
    in one page); sequences with keep False are left alone."""
    n = rows.shape[1]
    offsets = start[:, None] + jnp.arange(n)
    if page_table is None:
        index = (jnp.arange(rows.shape[0])[:, None], jnp.where(keep[:, None], offsets, -1))
    else:
        per_page = storage.shape[1]
        page = page_table[jnp.arange(rows.shape[0]), start // per_page]
        index = (jnp.where(keep, page, -1)[:, None], offsets % per_page)
    # Index -1 is out of bounds under mode="promise_in_bounds" semantics of
    # "drop": jax drops scatter updates at out-of-range indices.
    return storage.at[index].set(rows.astype(storage.dtype), mode="drop",
                                 wrap_negative_indices=False)


def _append_one(keys, values, k, v, positions, page_table):
    """Position positions[b] of sequence b gets k[b], v[b] ([B, Hkv, D])."""
    G = keys.group
    B = k.shape[0]
    row = lax_rem(positions, G)
    residual_k = keys.residual.at[jnp.arange(B), row].set(k.astype(keys.residual.dtype))
    residual_v = values.residual.at[jnp.arange(B), row].set(v.astype(values.residual.dtype))
    full = row == G - 1  # this token completes its group: quantize the group
    slots = keys.codes.shape[1] * (1 if page_table is None else page_table.shape[1])
    start = lax_rem(positions - (G - 1), slots)  # the group's first slot (G divides C)
    kf = residual_k.astype(jnp.float32)
    k_codes, k_scale, k_zero = _asymmetric(kf, axis=1)  # per channel over the G tokens
    vf = residual_v.astype(jnp.float32)
    grouped = vf.reshape(*vf.shape[:-1], -1, values.value_group)
    v_codes, v_scale, v_zero = _asymmetric(grouped, axis=-1)  # per token, channel groups
    keys = Kivi2Keys(_write_rows(keys.codes, pack2(k_codes), start, full, page_table),
                     _write_rows(keys.scale, k_scale, start // G, full, page_table),
                     _write_rows(keys.zero, k_zero, start // G, full, page_table),
                     residual_k)
    values = Kivi2Values(
        _write_rows(values.codes, pack2(v_codes.reshape(vf.shape)), start, full, page_table),
        _write_rows(values.scale, v_scale[..., 0], start, full, page_table),
        _write_rows(values.zero, v_zero[..., 0], start, full, page_table),
        residual_v)
    return keys, values


def kivi2_append(keys: Kivi2Keys, values: Kivi2Values, k_new, v_new, positions,
                 page_table=None) -> tuple[Kivi2Keys, Kivi2Values]:
    """The cache after appending k_new, v_new [B, T, Hkv, D]: token t of
    sequence b at position positions[b] + t (positions [B] int: the lengths
    before the append). Each token goes to the residual (in its dtype); a
    token that completes a group of G positions quantizes the group, as the
    residual holds it, into its G slots (slot = position mod C, C the
    capacity) and their group's scales. Pure: jit it with the cache donated
    to update in place."""
    positions = jnp.asarray(positions, jnp.int32)

    def one(cache, token):
        k, v, t = token
        return _append_one(*cache, k, v, positions + t, page_table), None
    tokens = (jnp.swapaxes(k_new, 0, 1), jnp.swapaxes(v_new, 0, 1),
              jnp.arange(k_new.shape[1], dtype=jnp.int32))
    return jax.lax.scan(one, (keys, values), tokens)[0]


def kivi2_residual_bytes(kv_heads: int, head_dim: int, *, group: int = 32,
                         residual_dtype=jnp.bfloat16) -> int:
    """Bytes of one sequence's KIVI-2 residual in one layer (keys and values)."""
    return 2 * group * kv_heads * head_dim * np.dtype(residual_dtype).itemsize


def lax_rem(x, n: int):
    """x mod n for int32 x >= -n (n static)."""
    return jax.lax.rem(x + n, n)
