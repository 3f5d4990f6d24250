"""Hopper (sm_90) int4 weight-only matmul for decode batches, in Pallas Mosaic
GPU: streams the packed weights (packing.py layout) at memory bandwidth.

Decode is bound by reading the weights, so the product is computed
transposed, out^T [N, M] = W^T [N, K] @ x^T [K, M]: the weights fill the
wgmma's 64-row M side and the few activation rows its N side (8..64, a
multiple of 8), so no tensor-core work is spent on padding rows of x.

Each block owns tn weight columns and one of split_k slices of K. A TMA
pipeline brings, per step, kt2 packed rows [kt2, tn] (holding K rows i.. and
K/2 + i.., one group each), the two groups' scale rows, and the two matching
[M, kt2] slices of x. The block unpacks the nibbles in registers (float32 by
the magic-number trick of packing.py), scales them to 16-bit weights, stores them to shared memory (the next step's unpacking
overlaps this step's wgmma) and accumulates W^T x^T into one float32 wgmma
accumulator. Split-K partial sums are added afterwards in XLA (they are
[split_k, N, M] floats: small next to the weights).

Supported: symmetric codes (no zero points), x in bf16/fp16 with at most 64
rows, group_size a multiple of 64, N a multiple of 128.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul.packing import unpack_nibbles_float
from pallas_kernels.quant_matmul.tiling import pad_to, round_up

MAX_ROWS = 64
DTYPES = (jnp.bfloat16, jnp.float16)


def _swizzled(dtype):
    cols = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(128))


def unsupported(x, packed, zeros, group_size: int) -> str | None:
    """Why the Mosaic kernel cannot take these operands (None if it can)."""
    if zeros is not None:
        return "zero points (asymmetric codes) are not supported"
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the kernel takes bfloat16 or float16"
    if x.shape[0] > MAX_ROWS:
        return f"x has {x.shape[0]} rows; the decode kernel takes at most {MAX_ROWS}"
    if group_size % 64:
        return f"group_size={group_size} must be a multiple of 64"
    if packed.shape[1] % 128:
        return f"N={packed.shape[1]} must be a multiple of 128 (swizzled TMA of the codes)"
    return None


def default_split_k(n: int, tn: int, steps: int) -> int:
    """Split K (in powers of two dividing the steps) until there are about two
    blocks per SM: unpacking needs the warps of both to keep up with HBM."""
    sms = getattr(jax.devices()[0], "core_count", 0) or 132
    tiles, split = -(-n // tn), 1
    while tiles * split <= sms and steps % (split * 2) == 0:
        split *= 2
    return split


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "block_k", "split_k",
                                             "stages"))
def int4_weight_only_mosaic(x, packed, scales, *, group_size: int, block_n: int = 128,
                            block_k: int = 64, split_k: int | None = None, stages: int = 4):
    """x [M, K] @ dequantised int4 weights (packed [K/2, N], scales [K/g, N])
    -> [M, N] in x's dtype; see reference.int4_weight_only_reference.
    block_n weight columns and block_k packed rows per step; split_k None
    picks about two blocks per SM."""
    why = unsupported(x, packed, None, group_size)
    if why:
        raise ValueError(f"the Mosaic GPU int4 kernel cannot run this call: {why}")
    M, K = x.shape
    half, N = packed.shape
    tn = block_n
    if tn not in (128, 256):
        raise ValueError(f"block_n={tn} must be 128 or 256 (128-byte swizzled code rows, "
                         f"at most 256 wgmma rows)")
    kt2 = block_k
    if kt2 % 64 or group_size % kt2:
        raise ValueError(f"block_k={kt2} must be a multiple of 64 dividing group_size="
                         f"{group_size} (a step stays inside one group)")
    steps_total = half // kt2
    split = split_k or default_split_k(N, tn, steps_total)
    if steps_total % split:
        raise ValueError(f"split_k={split} must divide the {steps_total} steps of "
                         f"{kt2} packed rows")
    steps = steps_total // split
    m8 = round_up(M, 8)
    xp = pad_to(x, (m8, K))
    dtype = x.dtype
    n_tiles = -(-N // tn)
    groups_half = half // group_size

    def body(x_ref, p_ref, s_ref, out_ref, w_smem, out_smem):
        j, c = lax.axis_index("n"), lax.axis_index("k")
        first = c * steps  # this slice's first step

        def group(s):
            return (first + s) * kt2 // group_size

        def dequant(q, s_smem):
            scale = plgpu.load(s_smem.at[0], (), layout=plgpu.Layout.WGMMA.reduce(0))
            return (q * lax.broadcast_in_dim(scale, q.shape, [1])).astype(dtype)

        def accumulate(acc_ref):
            def step(_, x_lo, x_hi, p_smem, s_lo, s_hi):
                p = plgpu.load(p_smem, (), layout=plgpu.Layout.WGMMA)
                # float32 codes without int-to-float conversions (packing.py)
                q_lo, q_hi = unpack_nibbles_float(p, jnp.float32, signed=True)
                w_lo, w_hi = dequant(q_lo, s_lo), dequant(q_hi, s_hi)
                plgpu.wgmma_wait(0)  # the previous step's products have read w_smem
                w_smem.at[0][...] = w_lo
                w_smem.at[1][...] = w_hi
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(w_smem.at[0], (1, 0)),
                            plgpu.transpose_ref(x_lo, (1, 0)))
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(w_smem.at[1], (1, 0)),
                            plgpu.transpose_ref(x_hi, (1, 0)))

            plgpu.emit_pipeline(
                step,
                grid=(steps,),
                in_specs=[
                    plgpu.BlockSpec((m8, kt2), lambda s: (0, first + s),
                                    transforms=_swizzled(dtype), delay_release=1),
                    plgpu.BlockSpec((m8, kt2), lambda s: (0, steps_total + first + s),
                                    transforms=_swizzled(dtype), delay_release=1),
                    plgpu.BlockSpec((kt2, tn), lambda s: (first + s, j), transforms=_swizzled(jnp.uint8)),
                    plgpu.BlockSpec((1, tn), lambda s: (group(s), j)),
                    plgpu.BlockSpec((1, tn), lambda s: (groups_half + group(s), j)),
                ],
                max_concurrent_steps=stages,
            )(x_ref, x_ref, p_ref, s_ref, s_ref)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((tn, m8), jnp.float32))
        out_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[c, pl.ds(j * tn, tn)])
        plgpu.wait_smem_to_gmem(0)

    partial_sums = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n_tiles * tn, m8), jnp.float32),
        scratch_types=[plgpu.SMEM((2, kt2, tn), dtype, transforms=_swizzled(dtype)),
                       plgpu.SMEM((tn, m8), jnp.float32)],
        grid=(n_tiles, split), grid_names=("n", "k"),
        compiler_params=plgpu.CompilerParams(),
    )(xp, packed, scales.astype(jnp.float32))
    out = partial_sums[0] if split == 1 else jnp.sum(partial_sums, axis=0)
    return out[:N, :M].T.astype(dtype)
