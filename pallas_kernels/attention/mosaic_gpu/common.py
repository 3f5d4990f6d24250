"""What every Hopper attention kernel shares: the static description of a
call (``Spec``), warpgroup math helpers and the kernel launcher.

Each kernel runs three warpgroups per block: ``CONSUMERS`` (two) doing the
math with wgmma, one producer streaming tiles from HBM into a ring of
shared-memory slots with TMA copies (``rings.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention import tuning
from pallas_kernels.attention.mask import visible

LOG2E = math.log2(math.e)
CONSUMERS = 2
HEAD_DIMS = (64, 128, 256)
# Registers per thread (producer, consumers): the forward and the fused
# backward give their consumers the most (forward faster on H100; the fused
# kernel's dK, dV and dQ accumulators spill less, 0.14 ms faster on H200); the
# separate dQ and dK/dV kernels use the shared split (240 measured no faster).
FWD_REGS = (24, 240)
FUSED_REGS = FWD_REGS
BWD_REGS = (mc.PRODUCER_REGS, mc.CONSUMER_REGS)
SMEM_SPARE = 4096  # what a query-parallel kernel leaves for row statistics, barriers, segment ids


@dataclasses.dataclass(frozen=True)
class Spec:
    q_len: int         # real lengths (positions and the padding mask use these)
    kv_len: int
    causal: bool
    window: int | None
    scale: float
    blocks: tuning.MosaicBlockSizes
    softcap: float | None = None
    segments: bool = False  # segment ids come as two extra kernel operands

    @property
    def offset(self):
        return self.kv_len - self.q_len

    def ranges(self):
        return dict(offset=self.offset, q_len=self.q_len, kv_len=self.kv_len,
                    causal=self.causal, window=self.window)

    def mask(self, q_pos, k_pos, q_seg=None, k_seg=None):
        """Visible pairs (positions already absolute, segment ids broadcast to
        the tile), padded keys excluded."""
        return visible(q_pos, k_pos, causal=self.causal, sliding_window=self.window,
                       q_segment=q_seg, k_segment=k_seg) & (k_pos < self.kv_len)

    def sweep_blocks(self, lo, flo, fhi, hi):
        """The block range for ``sweep``: every block is masked when segment
        ids decide visibility (no block is known to be fully visible)."""
        return (lo, hi, hi, hi) if self.segments else (lo, flo, fhi, hi)

    @property
    def exp_scale(self):
        """Factor from ``forward_logits`` to the base-2 exponent."""
        return LOG2E if self.softcap else self.scale * LOG2E

    def forward_logits(self, s):
        """q.k products -> logits up to the factor ``exp_scale``: the raw
        products (scaling folds into the exponent's FMA), or soft-capped ones."""
        if self.softcap is None:
            return s
        return jnp.tanh(s * (self.scale / self.softcap)) * self.softcap

    def base2_logits(self, s):
        """q.k products -> (base-2 logits, the derivative of the logits w.r.t.
        the scaled products: None for 1, 1 - tanh^2 when soft-capped)."""
        if self.softcap is None:
            return s * (self.scale * LOG2E), None
        t = jnp.tanh(s * (self.scale / self.softcap))
        return t * (self.softcap * LOG2E), 1.0 - t * t


def mma(a, b, shape):
    """a @ b with a fresh float32 accumulator; waits for the result."""

    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_acc(acc, a, b):
    """acc + a @ b for a float32 register accumulator."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def masked_logits(spec, s, row0, j, qs_v, ks_v):
    """Logits s [queries, keys] of a query-parallel tile (rows from row0, key
    block j) with the masked ones at -inf; qs_v and ks_v are the rows' and
    keys' segment ids (None without segments)."""
    seg = (mc.rows(qs_v, s.shape), mc.cols(ks_v, s.shape)) if spec.segments else ()
    ok = spec.mask(iota(s.shape, 0) + (row0 + spec.offset),
                   iota(s.shape, 1) + j * s.shape[1], *seg)
    return jnp.where(ok, s, -jnp.inf)


def vector(n, value, reduced_dim):
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(reduced_dim))


def zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def kernel_call(body, out_type, scratch, grid, names):
    """A kernel of two consumer warpgroups and one producer over ``grid``.

    Built on pl.kernel (plgpu.kernel's batching wrapper takes no refs) so that
    a ``jax.new_ref`` operand is updated in place: the fused backward adds
    its dQ partial sums into one."""

    def flash_attention(*refs):
        pl.run_scoped(lambda *s: body(*refs, *s), *scratch, collective_axes="wg")
    mesh = plgpu.Mesh(grid=grid, grid_names=names, num_threads=CONSUMERS + 1, thread_name="wg")
    return pl.kernel(flash_attention, out_type=out_type, mesh=mesh,
                     compiler_params=plgpu.CompilerParams(approx_math=True))


def sweep(step, lo, flo, fhi, hi, carry):
    """step(j, carry, masked) over blocks lo..hi-1, unmasked in [flo, fhi)."""
    masked = functools.partial(step, masked=True)
    carry = lax.fori_loop(lo, flo, masked, carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
    return lax.fori_loop(fhi, hi, masked, carry)
