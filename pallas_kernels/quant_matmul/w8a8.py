"""w8a8 int8 matmul as a portable BlockSpec Pallas kernel.

Weights are [N, K]. Each program owns a [bm, bn] output tile, walks K in
steps of bk with an int32
accumulator (int8 x int8 products summed exactly), and applies the per-token
and per-channel scales once, in the epilogue.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.quant_matmul.tiling import check_block, pow2_block
from pallas_kernels.shapes import pad_to, round_up


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, bk: int, nk: int):
    def step(k, acc):
        xk = x_ref[:, pl.ds(k * bk, bk)]
        wk = w_ref[:, pl.ds(k * bk, bk)]
        return acc + jax.lax.dot_general(xk, wk, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, nk, step, jnp.zeros(o_ref.shape, jnp.int32))
    o_ref[...] = (acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret",
                                             "num_warps", "num_stages"))
def w8a8_pallas(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, block_sizes=(128, 128, 128),
                interpret: bool = False, num_warps: int = 4, num_stages: int = 3):
    M, K = xq.shape
    N = wq.shape[0]
    bm, bn, bk = (pow2_block(d, b) for d, b in zip((M, N, K), block_sizes))
    for name, b in zip(("bm", "bn", "bk"), (bm, bn, bk)):
        check_block(name, b)
    Mp, Np, Kp = round_up(M, bm), round_up(N, bn), round_up(K, bk)
    x = pad_to(xq, (Mp, Kp))
    w = pad_to(wq, (Np, Kp))
    xs2 = pad_to(xs.astype(jnp.float32)[:, None], (Mp, 1))
    ws2 = pad_to(ws.astype(jnp.float32)[None, :], (1, Np))
    params = {} if interpret else dict(
        compiler_params=compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages))
    out = pl.pallas_call(
        functools.partial(_kernel, bk=bk, nk=Kp // bk),
        grid=(Mp // bm, Np // bn),
        in_specs=[pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, Kp), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        interpret=interpret, **params,
    )(x, xs2, w, ws2)
    return out[:M, :N]
