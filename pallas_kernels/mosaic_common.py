"""Pieces every Hopper (Pallas Mosaic GPU) kernel here shares: shared memory
in the layout wgmma and TMA read, vector broadcasts over a tile, the
register split between a copy-issuing producer and the math warpgroups, and
a block's last wait for its stores."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

# Registers per thread: the producer only issues TMA copies, so the consumers
# take the rest (measured on H100 for the backward attention and 8-bit
# matmul kernels; the attention forward gives its consumers more).
PRODUCER_REGS = 40
CONSUMER_REGS = 232
SMEM_PER_BLOCK = 227 * 1024  # the most shared memory a block may take on sm_90


def swizzled_smem(shape, dtype):
    """Shared memory [..., rows, cols] in 8-row tiles of 128 bytes, 128-byte
    swizzled: the layout wgmma operands and TMA copies use."""
    cols = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, cols)),
                                                plgpu.SwizzleTransform(128)))


def rows(v, shape):
    """Broadcast a per-row vector across the columns of a tile."""
    return lax.broadcast_in_dim(v, shape, [0])


def cols(v, shape):
    """Broadcast a per-column vector down the rows of a tile."""
    return lax.broadcast_in_dim(v, shape, [1])


def wait_stores_before_exit():
    """A block's last wait: its TMA stores have read shared memory. Their
    writes complete before the kernel does, so waiting for them as well would
    only idle the multiprocessor that the next block starts on."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
