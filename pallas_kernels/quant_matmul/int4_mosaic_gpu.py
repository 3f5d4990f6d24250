"""Hopper (sm_90) int4 weight-only matmul for decode batches, in Pallas Mosaic
GPU: streams the packed weights (packing.py layout) at memory bandwidth.

Decode is bound by reading the weights, so the product is computed
transposed, out^T [N, M] = W^T [N, K] @ x^T [K, M]: the weights fill the
wgmma's 64-row M side and the few activation rows its N side (8..64, a
multiple of 8), so no tensor-core work is spent on padding rows of x.

The packed bytes [N, K/2] are exactly a signed int4 array W^T [N, K], which
is what the kernel sees. Each block owns tn weight rows of W^T and one of
split_k slices of K. A TMA pipeline brings, per step, the [tn, kt] int4
codes, their group scales and the [M, kt] slice of x. The codes go from
shared memory straight into registers, 8 per thread and 32-bit load, are
moved into the wgmma operand layout by a shuffle and byte-permutes, and
Mosaic GPU converts them to bf16 two at a time (a byte-permute, a LOP3 and a
packed subtraction per pair: the magic-number trick of packing.py, on 32-bit
words); one packed multiply applies the scale, and the wgmma takes the
weights from registers. Nothing is written back to shared memory, so the
ALU work per weight is a few packed instructions, well under what streaming
at HBM speed allows. Split-K partial sums are added afterwards in XLA (they
are [split_k, N, M] floats: small next to the weights).

Supported: symmetric codes (no zero points), bf16 x with at most 64 rows
(the bf16 conversion is Mosaic GPU's fast path), group_size a multiple of 64.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels.quant_matmul.tiling import pad_to, round_up

MAX_ROWS = 64
CHUNK = 64  # K per wgmma: one 128-byte swizzled row of bf16 x


def _swizzled(dtype, minor: int):
    """Tiling and swizzle for a [rows, minor] block of dtype in shared memory."""
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits
    swizzle = plgpu.find_swizzle(bits * minor)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def unsupported(x, packed, zeros, group_size: int) -> str | None:
    """Why the Mosaic kernel cannot take these operands (None if it can)."""
    if zeros is not None:
        return "zero points (asymmetric codes) are not supported"
    if x.dtype != jnp.bfloat16:
        return f"x has dtype {x.dtype}; the kernel takes bfloat16"
    if x.shape[0] > MAX_ROWS:
        return f"x has {x.shape[0]} rows; the decode kernel takes at most {MAX_ROWS}"
    if group_size % CHUNK:
        return f"group_size={group_size} must be a multiple of {CHUNK}"
    if packed.shape[0] % 64:
        return f"N={packed.shape[0]} must be a multiple of 64 (wgmma rows)"
    return None


def default_block_k(k: int, group_size: int) -> int:
    """The largest step of 512, 256, 128 or 64 codes dividing K that holds
    whole groups or lies inside one (64 always does: group_size % 64 == 0)."""
    return next(b for b in (512, 256, 128, CHUNK)
                if k % b == 0 and (b % group_size == 0 or group_size % b == 0))


def default_split_k(n: int, tn: int, steps: int) -> int:
    """Split K (in powers of two dividing the steps) until there are about two
    blocks per SM, so that each SM has several warpgroups converting codes."""
    sms = compat.sm_count()
    tiles, split = -(-n // tn), 1
    while tiles * split <= sms and steps % (split * 2) == 0:
        split *= 2
    return split


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "block_k", "split_k",
                                             "stages"))
def int4_weight_only_mosaic(x, packed, scales, *, group_size: int, block_n: int = 64,
                            block_k: int | None = None, split_k: int | None = None,
                            stages: int = 3):
    """x [M, K] bf16 @ dequantised int4 weights (packed [N, K/2], scales
    [K/g, N]) -> [M, N] bf16; see reference.int4_weight_only_reference.
    block_n weight rows of W^T and block_k codes of K per step (None: the
    largest of 512..64 that fits K and the groups); split_k None picks about
    two blocks per SM."""
    why = unsupported(x, packed, None, group_size)
    if why:
        raise ValueError(f"the Mosaic GPU int4 kernel cannot run this call: {why}")
    M, K = x.shape
    N, half = packed.shape
    g = group_size
    tn, kt = block_n, block_k or default_block_k(K, g)
    if tn not in (64, 128, 256) or N % tn:
        raise ValueError(f"block_n={tn} must be 64, 128 or 256 and divide N={N}")
    if kt % CHUNK or (kt % g and g % kt) or K % kt:
        raise ValueError(f"block_k={kt} must be a multiple of {CHUNK} dividing K={K}, and a "
                         f"multiple or divisor of group_size={g}")
    steps_total = K // kt
    split = split_k or default_split_k(N, tn, steps_total)
    if steps_total % split:
        raise ValueError(f"split_k={split} must divide the {steps_total} steps of {kt} codes")
    steps = steps_total // split
    scale_rows = max(1, kt // g)  # group scale rows per step
    m8 = round_up(M, 8)
    xp = pad_to(x, (m8, K))
    # The same bytes as int4 W^T [N, K] (the low nibble is the even k).
    w_t = lax.bitcast_convert_type(packed, jnp.int4).reshape(N, K)
    n_tiles = N // tn
    chunks = kt // CHUNK

    def body(x_ref, w_ref, s_ref, out_ref, out_smem):
        j, c = lax.axis_index("n"), lax.axis_index("k")
        first = c * steps  # this slice's first step

        def accumulate(acc_ref):
            def step(_, w_smem, x_smem, s_smem):
                if chunks == 1:
                    # The last step's wgmma may still read the registers this
                    # step's weights are about to take.
                    plgpu.wgmma_wait(0)
                # 8 consecutive codes (32 bits) per thread and load; a shuffle
                # and byte-permutes move them into the wgmma operand layout.
                codes = plgpu.layout_cast(
                    plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X),
                    plgpu.Layout.WGMMA)
                for i in range(chunks):
                    ks = slice(i * CHUNK, (i + 1) * CHUNK)
                    scale = plgpu.load(s_smem.at[i * CHUNK // g if kt > g else 0], (),
                                       layout=plgpu.Layout.WGMMA.reduce(1))
                    w = codes[:, ks].astype(jnp.bfloat16) * lax.broadcast_in_dim(
                        scale.astype(jnp.bfloat16), (tn, CHUNK), [0])
                    plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(x_smem.at[:, ks], (1, 0)))
                    plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(
                step,
                grid=(steps,),
                in_specs=[
                    plgpu.BlockSpec((tn, kt), lambda s: (j, first + s),
                                    transforms=_swizzled(jnp.int4, kt)),
                    plgpu.BlockSpec((m8, kt), lambda s: (0, first + s),
                                    transforms=_swizzled(jnp.bfloat16, kt), delay_release=1),
                    plgpu.BlockSpec((scale_rows, tn),
                                    lambda s: ((first + s) * kt // (g * scale_rows), j)),
                ],
                max_concurrent_steps=stages,
            )(w_ref, x_ref, s_ref)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((tn, m8), jnp.float32))
        out_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[c, pl.ds(j * tn, tn)])
        plgpu.wait_smem_to_gmem(0)

    partial_sums = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, N, m8), jnp.float32),
        scratch_types=[plgpu.SMEM((tn, m8), jnp.float32)],
        grid=(n_tiles, split), grid_names=("n", "k"),
        compiler_params=plgpu.CompilerParams(),
    )(xp, w_t, scales.astype(jnp.float32))
    out = partial_sums[0] if split == 1 else jnp.sum(partial_sums, axis=0)
    return out[:, :M].T.astype(x.dtype)
