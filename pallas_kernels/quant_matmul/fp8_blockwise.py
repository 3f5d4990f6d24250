"""FP8 (e4m3) matmul with fine-grained block scales, DeepSeek-V3 style, as a
portable BlockSpec Pallas kernel.

Weights are [N, K]. Each program owns a [bm, bn] output tile (bn <= 128, so
the tile sits inside
one 128-wide weight-scale column) and walks K in 128-element blocks: the fp8
tensor-core product of one block is accumulated in fp32 after multiplying by
that block's activation scales (one per row) and weight scale (one per tile).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.quant_matmul.reference import FP8_BLOCK
from pallas_kernels.quant_matmul.tiling import check_block, pow2_block
from pallas_kernels.shapes import cdiv, pad_to, round_up


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, nk: int):
    def step(k, acc):
        xk = x_ref[:, pl.ds(k * FP8_BLOCK, FP8_BLOCK)]
        wk = w_ref[:, pl.ds(k * FP8_BLOCK, FP8_BLOCK)]
        part = jax.lax.dot_general(xk, wk, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return acc + part * xs_ref[:, pl.ds(k, 1)] * ws_ref[:, pl.ds(k, 1)]

    acc = jax.lax.fori_loop(0, nk, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret",
                                             "num_warps", "num_stages"))
def fp8_blockwise_pallas(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, block_sizes=(128, 128),
                         interpret: bool = False, num_warps: int = 8, num_stages: int = 3):
    M, K = xq.shape
    N = wq.shape[0]
    bm, bn = pow2_block(M, block_sizes[0]), pow2_block(N, block_sizes[1])
    check_block("bm", bm)
    check_block("bn", bn)
    if FP8_BLOCK % bn:
        raise ValueError(f"bn={bn} must divide the weight-scale block {FP8_BLOCK}")
    nk = cdiv(K, FP8_BLOCK)
    Mp, Np, Kp = round_up(M, bm), round_up(N, bn), nk * FP8_BLOCK
    x = pad_to(xq, (Mp, Kp))
    w = pad_to(wq, (Np, Kp))
    xs2 = pad_to(xs.astype(jnp.float32), (Mp, nk))
    ws2 = pad_to(ws.astype(jnp.float32), (cdiv(Np, FP8_BLOCK), nk))
    params = {} if interpret else dict(
        compiler_params=compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages))
    out = pl.pallas_call(
        functools.partial(_kernel, nk=nk),
        grid=(Mp // bm, Np // bn),
        in_specs=[pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, nk), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, Kp), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, nk), lambda i, j: (j * bn // FP8_BLOCK, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        interpret=interpret, **params,
    )(x, xs2, w, ws2)
    return out[:M, :N]
