"""Public quantised matmuls with ``implementation=`` dispatch.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the jnp reference (XLA's native int8 dot for w8a8);
  'mosaic_gpu' the Hopper kernels of mosaic_gpu.py (w8a8 and fp8 blockwise;
               ``tiling`` tunes them) and int4_mosaic_gpu.py (compiled only);
  'blockspec'  the portable kernels of w8a8.py, fp8_blockwise.py and
               int4_weight_only.py (``block_sizes`` tune them; Triton
               lowering on GPU, interpreted on CPU);
  'pallas'     'mosaic_gpu' where it takes the call (Hopper, compiled, no
               ``block_sizes``; for int4 the decode of bf16 x), else
               'blockspec';
  'auto'       'pallas' on GPU, 'xla' elsewhere.
Operands are jax or NumPy arrays (Python lists are refused). Sizes are
Python or NumPy ints: block_sizes powers of two >= 16, group_size, block_n and
split_k >= 1; tiling a mosaic_gpu.Tiling of ints. Leading batch dimensions of
x are flattened into rows. The w8a8 and fp8 kernels are inference kernels on
quantised codes; the int4 weight-only matmul is differentiable in x (through
the dequantised weights).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.quant_matmul import int4_mosaic_gpu, mosaic_gpu
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul.fp8_blockwise import fp8_blockwise_pallas
from pallas_kernels.quant_matmul.int4_weight_only import int4_weight_only_pallas
from pallas_kernels.quant_matmul.tiling import check_block
from pallas_kernels.quant_matmul.w8a8 import w8a8_pallas
from pallas_kernels.shapes import cdiv


def _mosaic_tiling_only(args):
    if args.tiling is not None:
        return f"tiling={args.tiling} applies only to the Mosaic GPU kernel"
    return None


def _portable_block_sizes_only(args):
    if args.block_sizes is not None:
        return (f"block_sizes={args.block_sizes} apply to the portable kernel; the Mosaic GPU "
                f"kernel takes tiling=")
    return None


def _int4_takes_no_tiles(args):
    if args.block_n is not None or args.split_k is not None:
        return (f"takes no block_n or split_k (block_n={args.block_n}, split_k={args.split_k} "
                f"tile the Pallas kernels)")
    return None


def _int4_mosaic(args):
    problem = int4_mosaic_gpu.unsupported(args.x, args.packed, args.zeros, args.group_size)
    if problem is None and args.split_k is not None:
        k = args.x.shape[1]
        problem = int4_mosaic_gpu.split_problem(
            k, int4_mosaic_gpu.default_block_k(k, args.group_size), args.split_k)
    return problem


# w8a8 and fp8 blockwise
TABLE = dispatch.Table("quantized matmul", {
    "xla": lambda args: _mosaic_tiling_only(args) or _portable_block_sizes_only(args),
    "mosaic_gpu": _portable_block_sizes_only,
    "blockspec": _mosaic_tiling_only,
}, preference=("pallas", "xla"))
INT4_TABLE = dispatch.Table("int4 matmul", {
    "xla": _int4_takes_no_tiles,
    "mosaic_gpu": _int4_mosaic,
    "blockspec": dispatch.takes_any,
}, preference=("pallas", "xla"))
IMPLEMENTATIONS = TABLE.names


def _check_dtype(name, a, allowed):
    if a.dtype not in allowed:
        raise ValueError(f"{name} has dtype {a.dtype}; expected one of "
                         f"{[jnp.dtype(d).name for d in allowed]}")


def _arrays(**arrays):
    """The named operands as jax arrays (dispatch.as_array), in order."""
    return tuple(dispatch.as_array(name, a) for name, a in arrays.items())


def _weights(wq):
    if wq.ndim != 2:
        raise ValueError(f"wq must be [N, K], got shape {wq.shape}")
    return wq.shape


def _check_tiles(block_sizes, count, tiling):
    """block_sizes as a tuple of ``count`` powers of two >= 16 (None stays
    None); tiling, when given, must be a mosaic_gpu.Tiling of positive ints."""
    if tiling is not None:
        if not isinstance(tiling, mosaic_gpu.Tiling):
            raise TypeError(f"tiling must be a mosaic_gpu.Tiling, got {tiling!r}")
        dispatch.check_sizes("tiling", tuple(tiling), len(mosaic_gpu.Tiling._fields))
    if block_sizes is None:
        return None
    block_sizes = dispatch.check_sizes("block_sizes", block_sizes, count)
    for i, block in enumerate(block_sizes):
        check_block(f"block_sizes[{i}]", block)
    return block_sizes


def _rows(x, k_name="K"):
    if x.ndim < 2:
        raise ValueError(f"x must be [..., {k_name}], got shape {x.shape}")
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def w8a8_matmul(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, implementation: str = "auto",
                block_sizes=None, tiling=None, interpret: bool | None = None):
    """int8 activations [..., K] with per-token scales xs [...], int8 weights
    [N, K] with per-channel scales ws [N] -> out [..., N] in out_dtype.
    block_sizes (bm, bn, bk) tune the portable kernel, tiling (a
    mosaic_gpu.Tiling) the Hopper one."""
    xq, xs, wq, ws = _arrays(xq=xq, xs=xs, wq=wq, ws=ws)
    _check_dtype("xq", xq, (jnp.int8,))
    _check_dtype("wq", wq, (jnp.int8,))
    dispatch.check_dtype("out_dtype", out_dtype)
    block_sizes = _check_tiles(block_sizes, 3, tiling)
    x2, lead = _rows(xq)
    N, K = _weights(wq)
    if x2.shape[1] != K or xs.shape != lead or ws.shape != (N,):
        raise ValueError(f"w8a8 shapes do not match: xq {xq.shape}, xs {xs.shape} (want {lead}), "
                         f"wq {wq.shape}, ws {ws.shape} (want ({N},))")
    impl, interpret = TABLE.resolve(implementation, interpret, block_sizes=block_sizes,
                                    tiling=tiling)
    xs2 = xs.reshape(-1).astype(jnp.float32)
    ws = ws.astype(jnp.float32)
    if impl == "xla":
        out = ref.w8a8_reference(x2, xs2, wq, ws, out_dtype=out_dtype)
    elif impl == "mosaic_gpu":
        out = mosaic_gpu.w8a8_mosaic(x2, xs2, wq, ws, out_dtype=out_dtype, tiling=tiling)
    else:
        out = w8a8_pallas(x2, xs2, wq, ws, out_dtype=out_dtype, interpret=interpret,
                          **({} if block_sizes is None else dict(block_sizes=block_sizes)))
    return out.reshape(*lead, N)


def fp8_blockwise_matmul(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, implementation: str = "auto",
                         block_sizes=None, tiling=None, interpret: bool | None = None):
    """e4m3 activations [..., K] with 1x128 block scales xs [..., ceil(K/128)],
    e4m3 weights [N, K] with 128x128 block scales ws [ceil(N/128),
    ceil(K/128)] -> out [..., N]. block_sizes (bm, bn) tune the portable
    kernel, tiling (a mosaic_gpu.Tiling) the Hopper one."""
    xq, xs, wq, ws = _arrays(xq=xq, xs=xs, wq=wq, ws=ws)
    _check_dtype("xq", xq, (jnp.float8_e4m3fn,))
    _check_dtype("wq", wq, (jnp.float8_e4m3fn,))
    dispatch.check_dtype("out_dtype", out_dtype)
    block_sizes = _check_tiles(block_sizes, 2, tiling)
    x2, lead = _rows(xq)
    N, K = _weights(wq)
    nk, nn = cdiv(K, ref.FP8_BLOCK), cdiv(N, ref.FP8_BLOCK)
    if x2.shape[1] != K or xs.shape != (*lead, nk) or ws.shape != (nn, nk):
        raise ValueError(f"fp8 blockwise shapes do not match: xq {xq.shape}, xs {xs.shape} "
                         f"(want {(*lead, nk)}), wq {wq.shape}, ws {ws.shape} (want {(nn, nk)})")
    impl, interpret = TABLE.resolve(implementation, interpret, block_sizes=block_sizes,
                                    tiling=tiling)
    xs2 = xs.reshape(-1, nk).astype(jnp.float32)
    ws = ws.astype(jnp.float32)
    if impl == "xla":
        out = ref.fp8_blockwise_reference(x2, xs2, wq, ws, out_dtype=out_dtype)
    elif impl == "mosaic_gpu":
        out = mosaic_gpu.fp8_blockwise_mosaic(x2, xs2, wq, ws, out_dtype=out_dtype,
                                              tiling=tiling)
    else:
        out = fp8_blockwise_pallas(x2, xs2, wq, ws, out_dtype=out_dtype, interpret=interpret,
                                   **({} if block_sizes is None else
                                      dict(block_sizes=block_sizes)))
    return out.reshape(*lead, N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _int4_with_grad(x, packed, scales, zeros, forward):
    return forward(x, packed, scales, zeros)


def _int4_fwd(x, packed, scales, zeros, forward):
    return forward(x, packed, scales, zeros), (packed, scales, zeros, x)


def _int4_bwd(forward, res, dy):
    packed, scales, zeros, x = res
    group_size = packed.shape[1] * 2 // scales.shape[0]
    w = ref.dequantize_int4(packed, scales, zeros, group_size=group_size)
    dx = jnp.dot(dy.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
    return dx.astype(x.dtype), None, None, None  # codes and scales are frozen


_int4_with_grad.defvjp(_int4_fwd, _int4_bwd)


def int4_weight_only_matmul(x, packed, scales, zeros=None, *, group_size: int,
                            implementation: str = "auto", block_n: int | None = None,
                            split_k: int | None = None, interpret: bool | None = None):
    """x [..., K] (bf16/fp16/f32) times int4 weights packed [N, K/2] (uint8)
    with group scales [K/g, N] (and zero points, for unsigned codes) ->
    [..., N] in x's dtype. block_n and split_k tile both kernels (split_k
    None: enough K slices to keep every SM streaming; the Mosaic kernel's
    slices of one block_n slice form a cluster and sum in shared memory). On
    Hopper, 'pallas' and 'auto' run the Mosaic GPU decode kernel
    int4_mosaic_gpu.py where it takes the call (symmetric codes, <= 64 rows
    of bf16 x, split_k dividing its K steps) and the portable kernel
    otherwise; 'mosaic_gpu' names the Mosaic kernel and raises where it
    cannot run."""
    x, packed, scales = _arrays(x=x, packed=packed, scales=scales)
    if zeros is not None:
        (zeros,) = _arrays(zeros=zeros)
    _check_dtype("x", x, (jnp.bfloat16, jnp.float16, jnp.float32))
    _check_dtype("packed", packed, (jnp.uint8,))
    group_size = dispatch.check_size("group_size", group_size)
    if block_n is not None:
        block_n = dispatch.check_size("block_n", block_n)
    if split_k is not None:
        split_k = dispatch.check_size("split_k", split_k)
    x2, lead = _rows(x)
    K = x2.shape[1]
    if packed.ndim != 2:
        raise ValueError(f"packed must be [N, K/2], got shape {packed.shape}")
    N, half = packed.shape
    if K != 2 * half:
        raise ValueError(f"x has K={K} but packed weights [{N}, {half}] hold K={2 * half}")
    if K % group_size:
        raise ValueError(f"group_size={group_size} must divide K={K}")
    groups = K // group_size
    if scales.shape != (groups, N) or (zeros is not None and zeros.shape != (groups, N)):
        raise ValueError(f"scales {scales.shape} / zeros {None if zeros is None else zeros.shape} "
                         f"must be [K/group_size, N] = {(groups, N)}")
    impl, interpret = INT4_TABLE.resolve(implementation, interpret, x=x2, packed=packed,
                                         zeros=zeros, group_size=group_size, block_n=block_n,
                                         split_k=split_k)
    if impl == "xla":
        def forward(x_, p_, s_, z_):
            return ref.int4_weight_only_reference(x_, p_, s_, z_, group_size=group_size)
    elif impl == "mosaic_gpu":
        def forward(x_, p_, s_, z_):
            del z_  # symmetric codes only (INT4_TABLE's 'mosaic_gpu' entry)
            return int4_mosaic_gpu.int4_weight_only_mosaic(
                x_, p_, s_, group_size=group_size, split_k=split_k,
                **({} if block_n is None else {"block_n": block_n}))
    else:
        # About 256 programs (block_n 128, split_k 4 at N=K=8192): within a
        # few percent of the fastest tiling in the H100 sweeps.
        bn = 128 if block_n is None else block_n
        if split_k is None:
            programs = cdiv(N, bn)
            split_k = math.gcd(groups, max(1, 256 // programs))

        def forward(x_, p_, s_, z_):
            return int4_weight_only_pallas(x_, p_, s_, z_, group_size=group_size, block_n=bn,
                                           split_k=split_k, interpret=interpret)
    out = _int4_with_grad(x2, packed, scales, zeros, forward)
    return out.reshape(*lead, N)
