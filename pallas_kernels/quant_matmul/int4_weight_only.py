"""int4 weight-only matmul for small-batch decode, as a portable BlockSpec
Pallas kernel.

Decode is bound by reading the weights, so they stay packed (two codes a
byte, packing.py layout) until they reach registers. Each program owns an
output tile [M, bn] and, optionally, one of ``split_k`` slices of K (partial
sums are added afterwards) so that enough programs stream weights at once.
Per step it loads g packed rows, which hold group i (low nibbles) and group
i + K/(2g) (high nibbles); the codes are unpacked straight into the
activation dtype (exact, by the magic-number trick of packing.py: no
int-to-float conversions, which would bound the kernel), the dot
accumulates in fp32 and the group's scale is applied to the [M, bn] partial
product rather than to the [g, bn] weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.quant_matmul.packing import unpack_nibbles_float
from pallas_kernels.quant_matmul.tiling import (
    MIN_DOT,
    check_block,
    pad_to,
    pow2_block,
    round_up,
)


def _kernel(x_lo_ref, x_hi_ref, p_ref, s_lo_ref, s_hi_ref, *rest, g: int, steps: int,
            asymmetric: bool):
    if asymmetric:
        z_lo_ref, z_hi_ref, o_ref = rest
    else:
        (o_ref,) = rest
    cd = x_lo_ref.dtype

    def step(t, acc):
        rows = pl.ds(t * g, g)
        lo, hi = unpack_nibbles_float(p_ref[rows, :], cd, signed=not asymmetric)
        if asymmetric:
            lo = lo - z_lo_ref[pl.ds(t, 1), :].astype(cd)
            hi = hi - z_hi_ref[pl.ds(t, 1), :].astype(cd)
        part_lo = jnp.dot(x_lo_ref[:, rows], lo, preferred_element_type=jnp.float32)
        part_hi = jnp.dot(x_hi_ref[:, rows], hi, preferred_element_type=jnp.float32)
        return acc + part_lo * s_lo_ref[pl.ds(t, 1), :] + part_hi * s_hi_ref[pl.ds(t, 1), :]

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "block_n", "split_k",
                                             "interpret", "num_warps", "num_stages"))
def int4_weight_only_pallas(x, packed, scales, zeros=None, *, group_size: int, out_dtype=None,
                            block_n: int = 128, split_k: int = 1, interpret: bool = False,
                            num_warps: int = 4, num_stages: int = 3):
    M, K = x.shape
    half, N = packed.shape
    g = group_size
    check_block("group_size", g)
    if half % g:
        raise ValueError(f"K/2={half} must be a multiple of group_size={g} for the packed layout")
    groups_half = half // g
    if groups_half % split_k:
        raise ValueError(f"split_k={split_k} must divide the {groups_half} groups in each half of K")
    bn = pow2_block(N, block_n)
    check_block("block_n", bn)
    Mp, Np = round_up(max(M, MIN_DOT), MIN_DOT), round_up(N, bn)
    steps = groups_half // split_k  # groups per program and half
    span = steps * g  # packed rows per program
    xp = pad_to(x, (Mp, K))
    p = pad_to(packed, (half, Np))
    s = pad_to(scales.astype(jnp.float32), (2 * groups_half, Np))
    asymmetric = zeros is not None
    operands = [xp, xp, p, s, s]
    in_specs = [pl.BlockSpec((Mp, span), lambda j, c: (0, c)),
                pl.BlockSpec((Mp, span), lambda j, c: (0, split_k + c)),
                pl.BlockSpec((span, bn), lambda j, c: (c, j)),
                pl.BlockSpec((steps, bn), lambda j, c: (c, j)),
                pl.BlockSpec((steps, bn), lambda j, c: (split_k + c, j))]
    if asymmetric:
        z = pad_to(zeros.astype(jnp.float32), (2 * groups_half, Np))
        operands += [z, z]
        in_specs += [pl.BlockSpec((steps, bn), lambda j, c: (c, j)),
                     pl.BlockSpec((steps, bn), lambda j, c: (split_k + c, j))]
    params = {} if interpret else dict(
        compiler_params=compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages))
    out_dtype = out_dtype or x.dtype
    # Without split-K the kernel writes the result; otherwise float32 partial
    # sums, added by XLA.
    partial_sums = pl.pallas_call(
        functools.partial(_kernel, g=g, steps=steps, asymmetric=asymmetric),
        grid=(Np // bn, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, Mp, bn), lambda j, c: (c, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split_k, Mp, Np),
                                       out_dtype if split_k == 1 else jnp.float32),
        interpret=interpret, **params,
    )(*operands)
    out = partial_sums[0] if split_k == 1 else jnp.sum(partial_sums, axis=0)
    return out[:M, :N].astype(out_dtype)
