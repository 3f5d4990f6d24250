"""Pure-jnp grouped matmul: the specification every kernel is tested against.

Rows of ``lhs`` are grouped contiguously: group g owns rows
[start_g, start_g + group_sizes[g]) with start_g = sum(group_sizes[:g]).
Rows past sum(group_sizes) belong to no group: gmm gives them zeros and tgmm
ignores them. Groups reaching past M are cut at M. Products accumulate in
float32. Written for clarity (one mask per group), not speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids(group_sizes, m: int):
    """Group of each of the m rows: int32 [m], equal to G for rows in no group."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def _masked_rows(x, group_sizes):
    """[M, C] -> [G, M, C]: slice g keeps only the rows of group g."""
    g = group_sizes.shape[0]
    member = group_ids(group_sizes, x.shape[0])[None, :] == jnp.arange(g)[:, None]
    return jnp.where(member[:, :, None], x.astype(jnp.float32)[None], 0.0)


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs: bool = False,
                  preferred_element_type=None):
    """out[m] = lhs[m] @ rhs[group(m)]; lhs [M,K], rhs [G,K,N] ([G,N,K] when
    transpose_rhs) -> [M,N] in preferred_element_type (default lhs.dtype)."""
    rhs32 = rhs.astype(jnp.float32)
    if transpose_rhs:
        rhs32 = jnp.swapaxes(rhs32, 1, 2)
    out = jnp.einsum("gmk,gkn->mn", _masked_rows(lhs, group_sizes), rhs32,
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(preferred_element_type or lhs.dtype)


def tgmm_reference(lhs, dout, group_sizes, *, preferred_element_type=None):
    """out[g] = lhs[rows_g]^T @ dout[rows_g]; lhs [M,K], dout [M,N] -> [G,K,N]
    (zeros for empty groups) in preferred_element_type (default lhs.dtype)."""
    out = jnp.einsum("gmk,mn->gkn", _masked_rows(lhs, group_sizes), dout.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(preferred_element_type or lhs.dtype)


def gmm_flops(m: int, k: int, n: int) -> float:
    """FLOPs of one grouped matmul over m routed rows (2*M*K*N); the forward
    plus backward (gmm, gmm for d-lhs, tgmm for d-rhs) is three times this."""
    return 2.0 * m * k * n
