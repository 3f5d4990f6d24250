"""Storage formats of a KV cache and what each costs per token.

A cache tensor (keys or values) is [..., tokens, kv_heads, head_dim] in one
of:
  'bf16' (or any float dtype)  the values themselves;
  'int8'  QuantizedKV: int8 codes, one float32 absmax scale per token and
          head (x ~ code * scale, codes in [-127, 127]);
  'fp8'   QuantizedKV: float8_e4m3fn codes, one float32 absmax scale per
          token and head (x ~ code * scale, |code| <= 448).
Quantizing one token touches no other token, so a cache engine quantizes the
new tokens and writes their codes and scales into its slots like any other
values.
"""
from __future__ import annotations

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


def kv_bytes_per_token(fmt: str, kv_heads: int, head_dim: int) -> float:
    """Bytes one token takes in one layer's cache, keys and values together:
    fmt a float dtype name ('bfloat16', 'bf16', 'float16', 'float32') or a
    quantized format ('int8', 'fp8': codes plus a float32 scale per head)."""
    if fmt in CODES:
        per_head = head_dim * CODES[fmt][0].itemsize + SCALE_DTYPE.itemsize
    else:
        per_head = head_dim * _float_dtype(fmt).itemsize
    return 2.0 * kv_heads * per_head


def _float_dtype(name: str):
    try:
        dtype = jnp.dtype({"bf16": "bfloat16"}.get(name, name))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"unknown KV format {name!r}; use a float dtype name or one of "
                         f"{FORMATS}")
    return np.dtype(dtype)
