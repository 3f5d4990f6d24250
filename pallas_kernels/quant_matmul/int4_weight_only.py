"""int4 weight-only matmul for small-batch decode, as a portable BlockSpec
Pallas kernel.

Decode is bound by reading the weights, so they stay packed (two codes a
byte, packing.py layout: [N, K/2], even k in the low nibble) until they reach
registers. Each program owns an output tile [M, bn] and, optionally, one of
``split_k`` slices of K (partial sums are added afterwards) so that enough
programs stream weights at once. Per step it loads the [bn, g/2] bytes of one
group of g codes and unpacks their even and odd k straight into the
activation dtype (exact, by the magic-number trick of packing.py: no
int-to-float conversions, which would bound the kernel); the wrapper splits
x into its even and odd columns to match, the two dots accumulate in fp32
and the group's scale is applied to the [M, bn] partial product rather than
to the [bn, g] weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.quant_matmul.packing import unpack_nibbles_float
from pallas_kernels.quant_matmul.tiling import check_block, pow2_block
from pallas_kernels.shapes import pad_to, round_up


def _kernel(x_even_ref, x_odd_ref, p_ref, s_ref, *rest, g2: int, steps: int,
            asymmetric: bool):
    if asymmetric:
        z_ref, o_ref = rest
    else:
        (o_ref,) = rest
    cd = x_even_ref.dtype
    nt = (((1,), (1,)), ((), ()))  # x [M, g/2] . w [bn, g/2]^T

    def step(t, acc):
        cols = pl.ds(t * g2, g2)
        even, odd = unpack_nibbles_float(p_ref[:, cols], cd, signed=not asymmetric)
        x_even, x_odd = x_even_ref[:, cols], x_odd_ref[:, cols]
        part = (lax.dot_general(x_even, even, nt, preferred_element_type=jnp.float32)
                + lax.dot_general(x_odd, odd, nt, preferred_element_type=jnp.float32))
        if asymmetric:  # x . (q - z) = x . q - z * sum(x), per group
            x_sum = jnp.sum(x_even.astype(jnp.float32) + x_odd.astype(jnp.float32), axis=1,
                            keepdims=True)
            part = part - x_sum * z_ref[pl.ds(t, 1), :]
        return acc + part * s_ref[pl.ds(t, 1), :]

    acc = lax.fori_loop(0, steps, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "block_m", "block_n",
                                             "split_k", "interpret", "num_warps", "num_stages"))
def int4_weight_only_pallas(x, packed, scales, zeros=None, *, group_size: int, out_dtype=None,
                            block_m: int = 64, block_n: int = 128, split_k: int = 1,
                            interpret: bool = False, num_warps: int = 4, num_stages: int = 3):
    M, K = x.shape
    N, half = packed.shape
    g = group_size
    check_block("group_size // 2", g // 2)  # the dots contract g/2 codes
    if K % g:
        raise ValueError(f"K={K} must be a multiple of group_size={g}")
    groups = K // g
    if groups % split_k:
        raise ValueError(f"split_k={split_k} must divide the {groups} groups of K")
    bn, bm = pow2_block(N, block_n), pow2_block(M, block_m)
    check_block("block_n", bn)
    check_block("block_m", bm)
    # Decode batches are one block of rows (a power of two, as Triton wants);
    # a prefill's rows are tiled, since the pipeline's x tiles grow with the
    # block's rows and 1024 of them overflow shared memory.
    Mp, Np = round_up(M, bm), round_up(N, bn)
    steps = groups // split_k  # groups per program
    span = steps * g // 2  # packed columns per program
    x_even = pad_to(x[:, 0::2], (Mp, half))
    x_odd = pad_to(x[:, 1::2], (Mp, half))
    p = pad_to(packed, (Np, half))
    s = pad_to(scales.astype(jnp.float32), (groups, Np))
    asymmetric = zeros is not None
    operands = [x_even, x_odd, p, s]
    in_specs = [pl.BlockSpec((bm, span), lambda i, j, c: (i, c)),
                pl.BlockSpec((bm, span), lambda i, j, c: (i, c)),
                pl.BlockSpec((bn, span), lambda i, j, c: (j, c)),
                pl.BlockSpec((steps, bn), lambda i, j, c: (c, j))]
    if asymmetric:
        operands.append(pad_to(zeros.astype(jnp.float32), (groups, Np)))
        in_specs.append(pl.BlockSpec((steps, bn), lambda i, j, c: (c, j)))
    params = {} if interpret else dict(
        compiler_params=compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages))
    out_dtype = out_dtype or x.dtype
    # Without split-K the kernel writes the result; otherwise float32 partial
    # sums, added by XLA.
    partial_sums = pl.pallas_call(
        functools.partial(_kernel, g2=g // 2, steps=steps, asymmetric=asymmetric),
        grid=(Mp // bm, Np // bn, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, c: (c, i, j)),
        out_shape=jax.ShapeDtypeStruct((split_k, Mp, Np),
                                       out_dtype if split_k == 1 else jnp.float32),
        interpret=interpret, **params,
    )(*operands)
    out = partial_sums[0] if split_k == 1 else jnp.sum(partial_sums, axis=0)
    return out[:M, :N].astype(out_dtype)
