"""Cases and checks shared by the block-sparse attention tests.

A case draws q, k, v, a cotangent, segment ids and random duplicate-free
lists with numpy (nothing to compile): each list row holds 0 to max_blocks
distinct key blocks in random order, and its entries past the count hold
garbage (out-of-range and repeated values), which every implementation must
ignore. Runs compare out, dq, dk, dv (jax.vjp with the random cotangent)
with the reference's by relative error ||got - want|| / ||want||: under
F32_TOL for float32 inputs, LOW_PRECISION_TOL for 16-bit ones.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention

F32_TOL = 1e-5
LOW_PRECISION_TOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    block_q: int
    block_k: int
    list_heads: int         # heads (per query head) or kv_heads (shared by a kv group)
    max_blocks: int
    causal: bool = False
    segments: bool = False  # a pair of sorted random ids, 3 segments a row
    softmax_scale: float | None = None
    dtype: object = jnp.float32

    @property
    def num_q_blocks(self):
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self):
        return -(-self.kv_len // self.block_k)

    @property
    def tolerance(self):
        return F32_TOL if self.dtype == jnp.float32 else LOW_PRECISION_TOL

    def kwargs(self):
        return dict(block_q=self.block_q, block_k=self.block_k, causal=self.causal,
                    softmax_scale=self.softmax_scale)


def random_lists(rng, case):
    """(indices [B,H,nQ,M], counts [B,H,nQ]) int32: distinct blocks in random
    order, garbage past each count; about one row in five is empty."""
    shape = (case.batch, case.list_heads, case.num_q_blocks)
    M, nK = case.max_blocks, case.num_kv_blocks
    indices = rng.integers(-3, nK + 3, shape + (M,)).astype(np.int32)
    counts = np.where(rng.random(shape) < 0.2, 0,
                      rng.integers(1, min(M, nK) + 1, shape)).astype(np.int32)
    for pos in np.ndindex(shape):
        indices[pos][:counts[pos]] = rng.choice(nK, counts[pos], replace=False)
    return jnp.asarray(indices), jnp.asarray(counts)


def inputs(case, seed):
    """q, k, v, cotangent (case dtype), lists and segment ids (None or a pair)."""
    rng = np.random.default_rng(seed)
    q_shape = (case.batch, case.q_len, case.heads, case.head_dim)
    kv_shape = (case.batch, case.kv_len, case.kv_heads, case.head_dim)
    q, k, v, cot = (jnp.asarray(rng.standard_normal(s, np.float32), case.dtype)
                    for s in (q_shape, kv_shape, kv_shape, q_shape))
    segments = None
    if case.segments:
        segments = tuple(jnp.asarray(np.sort(rng.integers(0, 3, (case.batch, n)), axis=1),
                                     jnp.int32) for n in (case.q_len, case.kv_len))
    return q, k, v, cot, random_lists(rng, case), segments


def out_and_grads(case, implementation, q, k, v, cot, lists, segments, **kw):
    """out, dq, dk, dv of one implementation (jitted; the lists traced)."""
    def run(q, k, v, cot, lists, segments):
        def attention(q, k, v):
            return block_sparse_attention(q, k, v, *lists, segment_ids=segments,
                                          implementation=implementation, **case.kwargs(), **kw)
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(cot))
    return jax.jit(run)(q, k, v, cot, lists, segments)


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm((got - want).ravel()) / np.linalg.norm(want.ravel()))


def compare(case, got, want):
    """out, dq, dk, dv: dtype and shape as the reference's, finite, within tolerance."""
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype == case.dtype and g.shape == w.shape, what
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{what} has non-finite values"
        err = relative_error(g, w)
        assert err < case.tolerance, f"{what}: relative error {err:.2e} >= {case.tolerance:.0e}"


@functools.lru_cache(maxsize=None)
def reference_run(case, seed):
    """The reference's out and gradients on a case's inputs (in float32)."""
    args = inputs(case, seed)
    f32 = dataclasses.replace(case, dtype=jnp.float32)
    upcast = [x.astype(jnp.float32) for x in args[:4]]
    return tuple(x.astype(case.dtype) for x in out_and_grads(f32, "xla", *upcast, *args[4:]))
