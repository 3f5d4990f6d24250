"""Public decode-attention entry point with ``implementation=`` dispatch.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the pure-jnp reference (reference.py; differentiable);
  'mosaic_gpu' the Hopper flash-decoding kernel of mosaic_gpu.py (bf16/f16
               queries, head_dim 64 or 128, at most 64 query rows per kv
               head; compiled only);
  'blockspec'  the portable flash-decoding kernel of blockspec.py (compiled
               on a GPU, interpreted on CPU; head_dim a power of two >= 16);
  'pallas'     'mosaic_gpu' where it takes the call, else 'blockspec';
  'auto'       'pallas' on a GPU, the reference on CPU.
Semantics, layouts and the ring rule: reference.py and positions.py.

The Pallas kernels are inference-only: differentiating through one raises a
TypeError naming it (use implementation='xla' to differentiate).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.decode_attention import blockspec, blockspec_kivi, mosaic_gpu
from pallas_kernels.decode_attention.kv_formats import (CODES, KIVI_PARAM_DTYPE, KIVI_PER_BYTE,
                                                        KIVI_TYPES, SCALE_DTYPE, Kivi2Keys,
                                                        Kivi2Values, QuantizedKV)
from pallas_kernels.decode_attention.reference import decode_attention_reference

FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
CODE_DTYPES = tuple(dtype for dtype, _ in CODES.values())


def _check_kivi(name: str, x):
    """A Kivi2Keys (k) or Kivi2Values (v) with consistent leaves."""
    want = Kivi2Keys if name == "k" else Kivi2Values
    if not isinstance(x, want):
        raise TypeError(f"{name} must be a {want.__name__} for KIVI-2, got {type(x).__name__}")
    leaves = {f: dispatch.as_array(f"{name}.{f}", getattr(x, f)) for f in want._fields}
    codes, scale, zero, residual = leaves.values()
    if codes.dtype != jnp.uint8 or codes.ndim != 4:
        raise TypeError(f"{name}.codes must be uint8 [N, S, Hkv, D/4], got {codes.dtype} "
                        f"{codes.shape}")
    N, S, Hkv, D = (*codes.shape[:3], codes.shape[3] * KIVI_PER_BYTE)
    G = residual.shape[1] if residual.ndim == 4 else 0
    if residual.ndim != 4 or residual.shape[2:] != (Hkv, D) or G < 1 or S % G:
        raise ValueError(f"{name}.residual must be [B, G, Hkv, D] = [B, G, {Hkv}, {D}] with G "
                         f"dividing S={S}, got {residual.shape}")
    if residual.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.residual must be float32, bfloat16 or float16, got "
                        f"{residual.dtype}")
    rows = S // G if name == "k" else S
    for field, a in (("scale", scale), ("zero", zero)):
        if a.dtype != KIVI_PARAM_DTYPE or a.ndim != 4 or a.shape[:3] != (N, rows, Hkv):
            raise ValueError(f"{name}.{field} must be float16 [{N}, {rows}, {Hkv}, ...], got "
                             f"{a.dtype} {a.shape}")
    groups = D if name == "k" else scale.shape[3]
    if scale.shape != zero.shape or groups < 1 or D % groups or scale.shape[3] != groups:
        raise ValueError(f"{name}.scale {scale.shape} and zero {zero.shape} must match and "
                         f"split head_dim {D} evenly")
    return want(*leaves.values())


def _check_cache(name: str, x):
    """A cache tensor (a float array, QuantizedKV or KIVI-2) with a 4-d layout."""
    if isinstance(x, KIVI_TYPES):
        return _check_kivi(name, x)
    if isinstance(x, QuantizedKV):
        data = dispatch.as_array(f"{name}.data", x.data)
        scale = dispatch.as_array(f"{name}.scale", x.scale)
        if data.dtype not in CODE_DTYPES:
            raise TypeError(f"{name}.data must be int8 or float8_e4m3fn, got {data.dtype}")
        if scale.dtype != SCALE_DTYPE:
            raise TypeError(f"{name}.scale must be float32, got {scale.dtype}")
        if data.ndim != 4 or scale.shape != data.shape[:3]:
            raise ValueError(f"{name} must be QuantizedKV(data [N, S, Hkv, D], scale "
                             f"[N, S, Hkv]), got data {data.shape}, scale {scale.shape}")
        return QuantizedKV(data, scale)
    x = dispatch.as_array(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or a QuantizedKV, got "
                        f"{x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be [N, S, Hkv, D], got shape {x.shape}")
    return x


def check_inputs(q, k, v, lengths, page_table):
    """Arrays checked and converted: (q, k, v, lengths int32, page_table
    int32 or None). Raises a one-line error naming the bad argument."""
    q = dispatch.as_array("q", q)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if q.ndim != 4 or min(q.shape) < 1:
        raise ValueError(f"q must be [B, T, Hq, D] with every size >= 1, got shape {q.shape}")
    k, v = _check_cache("k", k), _check_cache("v", v)
    B, T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if k.shape[3] != D:
        raise ValueError(f"head_dim of k {k.shape} differs from q's {q.shape}")
    if Hq % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide q heads ({Hq})")
    lengths = dispatch.as_array("lengths", lengths, integer=True)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B] = ({B},), got shape {lengths.shape}")
    if isinstance(k, KIVI_TYPES) != isinstance(v, KIVI_TYPES):
        kinds = [type(x).__name__ if isinstance(x, tuple) else "an array" for x in (k, v)]
        raise TypeError(f"KIVI-2 caches come in pairs (Kivi2Keys k, Kivi2Values v); got k "
                        f"{kinds[0]}, v {kinds[1]}")
    if isinstance(k, KIVI_TYPES):
        if k.residual.shape != v.residual.shape or k.residual.shape[0] != B:
            raise ValueError(f"k.residual {k.residual.shape} and v.residual "
                             f"{v.residual.shape} must both be [B={B}, G, Hkv, D]")
    if page_table is None:
        if k.shape[0] != B:
            raise ValueError(f"a contiguous cache k {k.shape} needs batch {B} (q {q.shape}); "
                             f"pass page_table for a paged pool")
        capacity = k.shape[1]
    else:
        page_table = dispatch.as_array("page_table", page_table, integer=True)
        if page_table.ndim != 2 or page_table.shape[0] != B or page_table.shape[1] < 1:
            raise ValueError(f"page_table must be [B, pages_per_seq] with B = {B}, got shape "
                             f"{page_table.shape}")
        capacity = page_table.shape[1] * k.shape[1]
        page_table = page_table.astype(jnp.int32)
    if T > capacity:
        raise ValueError(f"q holds T={T} new tokens, more than the cache capacity {capacity}")
    return q, k, v, lengths.astype(jnp.int32), page_table


def _takes_no_tiling(args):
    given = [f"{name}={getattr(args, name)}" for name in ("block_kv", "num_splits")
             if getattr(args, name) is not None]
    return f"takes no {', '.join(given)} (they tile a Pallas kernel)" if given else None


def _blockspec_problem(args):
    if isinstance(args.k, KIVI_TYPES):
        if args.block_kv is not None:
            return f"block_kv={args.block_kv}: KIVI-2 caches are walked by key group"
        return blockspec.unsupported(args.q, args.k) or blockspec_kivi.unsupported(
            args.k, args.v, args.page_table)
    if args.block_kv is not None and args.page_table is not None:
        return f"block_kv={args.block_kv} applies to a contiguous cache (a paged one steps by page)"
    if args.block_kv is not None and (args.block_kv < blockspec.MIN_TILE
                                      or args.block_kv & (args.block_kv - 1)):
        return f"block_kv={args.block_kv} must be a power of two >= {blockspec.MIN_TILE}"
    return blockspec.unsupported(args.q, args.k)


def _mosaic_problem(args):
    return mosaic_gpu.unsupported(args.q, args.k, args.v, args.page_table, args.block_kv)


TABLE = dispatch.Table("decode attention", {
    "xla": _takes_no_tiling,
    "mosaic_gpu": _mosaic_problem,
    "blockspec": _blockspec_problem,
}, preference=("pallas", "xla"))
IMPLEMENTATIONS = TABLE.names


def _optional(**options):
    """{name: None or check(name, value)} of (value, check) pairs."""
    return {name: None if value is None else check(name, value)
            for name, (value, check) in options.items()}


def portable_kernel(k):
    """The portable kernel for this cache format: the KIVI-2 one (which
    takes block_kv=None only) or blockspec.py's."""
    if isinstance(k, KIVI_TYPES):
        return blockspec_kivi.kivi_decode_attention
    return blockspec.blockspec_decode_attention


def inference_only(name: str, fn, *args):
    """fn(*args), refusing differentiation (forward or reverse) with a
    one-line TypeError naming the implementation."""
    @jax.custom_jvp
    def run(*args):
        return fn(*args)

    @run.defjvp
    def _refuse(primals, tangents):
        raise TypeError(f"decode_attention implementation={name!r} is inference-only (no "
                        f"gradient); use implementation='xla' to differentiate")
    return run(*args)


def decode_attention(q, k, v, lengths, *, page_table=None, sliding_window: int | None = None,
                     logit_softcap: float | None = None, scale: float | None = None,
                     implementation: str = "auto", interpret: bool | None = None,
                     block_kv: int | None = None, num_splits: int | None = None):
    """Attention of the T newest tokens against a KV cache -> [B, T, Hq, D] in q.dtype.

    q [B, T, Hq, D]; k, v [B, S, Hkv, D] (contiguous) or [P, page_size, Hkv, D]
    (paged, with page_table [B, pages_per_seq] int); either may be a
    QuantizedKV. lengths [B] int: cache tokens per sequence, the T new ones
    included. Query t sits at position lengths - T + t; slot s holds position
    lengths-1 - ((lengths-1-s) mod C) (the ring rule of positions.py).
    sliding_window w (an int >= 1): positions fewer than w before the query.
    logit_softcap c (a finite float > 0): logits become c*tanh(logits/c).
    scale (a finite float > 0) defaults to D**-0.5. Arrays are jax or NumPy
    arrays (Python lists are refused). Cache slots that no query sees get
    zero weight; the Pallas kernels still read some of them (the rest of a
    block or page), so the cache must hold finite values there (zeros or
    stale tokens do).
    Tuning (Pallas kernels only): block_kv, slots a step of a contiguous
    cache covers; num_splits, splits of the cache length (None: enough
    programs to fill the GPU; 'mosaic_gpu' then gives each SM an equal
    range of all the sequences' tiles instead, splits.Schedule).
    """
    q, k, v, lengths, page_table = check_inputs(q, k, v, lengths, page_table)
    size, real = dispatch.check_size, dispatch.check_positive_real
    kwargs = _optional(sliding_window=(sliding_window, size), logit_softcap=(logit_softcap, real),
                       scale=(scale, real))
    tiling = _optional(block_kv=(block_kv, size), num_splits=(num_splits, size))
    impl, interpret = TABLE.resolve(implementation, interpret, q=q, k=k, v=v,
                                    page_table=page_table, **kwargs, **tiling)
    if impl == "xla":
        return decode_attention_reference(q, k, v, lengths, page_table=page_table, **kwargs)
    if impl == "mosaic_gpu":
        kernel = functools.partial(mosaic_gpu.mosaic_decode_attention, **kwargs, **tiling)
    else:
        kernel = functools.partial(portable_kernel(k), interpret=interpret, **kwargs, **tiling)
    return inference_only(impl, kernel, q, k, v, lengths, page_table)
