"""Moving rows between token order and expert order.

A gather's automatic gradient is a scatter-add, and un-sorting rows with
`.at[order].set(rows)` is a scatter whose gradient JAX builds from further
scatters over id arrays of the rows' full shape. take_rows and combine_rows
are gathers in both directions instead: each move knows its inverse index
map, which exists when every row is copied to a bounded number of places (k
choices of a token). An index past the end of the array it reads ("empty")
selects a zero row: empty buffer slots, dropped assignments.

Every row move is pallas_kernels.row_gather (a gather, optionally summing
weighted sources per row) with the caller's implementation: 'xla' is XLA's
gather fused with the sum, 'pallas' the Triton kernel.

Where a row may be copied any number of times (expert choice: a token chosen
by 0..E experts) the sum over its copies is a float32 scatter-add
(gather_rows' gradient, add_rows); an inverse map over all (token, expert)
pairs would touch E / (k * capacity factor) times as many rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.row_gather import row_gather


class Sorted(NamedTuple):
    ids: jax.Array  # [N] int32, ascending
    order: jax.Array  # [N] int32: sorted entry i is unsorted entry order[i]
    inverse: jax.Array  # [N] int32: unsorted entry j is sorted entry inverse[j]


def sort_ids(ids) -> Sorted:
    """Stable sort of the int ids [N], with the permutation both ways. The
    inverse is one int32 scatter of N entries (a permutation: no collisions)."""
    n = ids.shape[0]
    iota = jnp.arange(n, dtype=jnp.int32)
    sorted_ids, order = jax.lax.sort((ids.astype(jnp.int32), iota), num_keys=1, is_stable=True)
    inverse = jnp.zeros_like(iota).at[order].set(iota, unique_indices=True)
    return Sorted(sorted_ids, order, inverse)


def bincount(ids, length: int):
    """int32 [length]: how often each of 0..length-1 occurs in the int array
    ids (other values are not counted). A compare-and-sum that XLA fuses into
    one reduction; no scatter-add, no one-hot buffer in memory."""
    flat = ids.reshape(-1, 1)
    return jnp.sum(flat == jnp.arange(length, dtype=flat.dtype), axis=0, dtype=jnp.int32)


def _take(rows, index):
    return jnp.take(rows, index, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x, index, inverse, implementation: str = "auto"):
    """x[index] (zero rows where index is empty), x [N, D], index [M].

    inverse [N, r] lists, for every row of x, the r places of the output that
    copy it (empty where fewer): the gradient is then the gather-and-sum
    dx[n] = sum_j g[inverse[n, j]], accumulated in float32. implementation:
    row_gather's, both ways."""
    return row_gather(x, index, implementation=implementation)


def _take_rows_fwd(x, index, inverse, implementation):
    return take_rows(x, index, inverse, implementation), inverse


def _take_rows_bwd(implementation, inverse, g):
    return row_gather(g, inverse, implementation=implementation), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def combine_rows(y, slot, weight, source, implementation: str = "auto"):
    """out[t] = sum_j weight[t, j] * y[slot[t, j]] in float32: y [M, D] expert
    outputs, slot [T, k] the row of each (token, choice), empty when dropped;
    source [M] the flat (token, choice) index t * k + j of every row, empty
    for rows of no assignment. Gradients: dy[m] = weight * g of the row's
    token (a gather through source), dweight[t, j] = y[slot[t, j]] . g[t]
    (with g rounded to y's dtype). implementation: row_gather's."""
    return row_gather(y, slot, weight, out_dtype=jnp.float32, implementation=implementation)


def _combine_fwd(y, slot, weight, source, implementation):
    return combine_rows(y, slot, weight, source, implementation), (y, slot, weight, source)


def _combine_bwd(implementation, res, g):
    y, slot, weight, source = res
    T, k = slot.shape
    # Both gradients in expert order from one gather of g's rows (in y's dtype:
    # dy is rounded to it anyway), so y is read in order; the per-row dot
    # products then move to token order as scalars. The gathered rows stay
    # 16-bit until each consumer widens them: where XLA keeps them in memory
    # for its two users, a float32 copy ([T * k, D]) would double the bytes.
    g_rows = row_gather(g.astype(y.dtype), source // k, implementation=implementation)
    w_row = _take(weight.reshape(-1), source).astype(jnp.float32)
    dy = (w_row[:, None] * g_rows.astype(jnp.float32)).astype(y.dtype)
    dweight = _take(jnp.sum(y.astype(jnp.float32) * g_rows.astype(jnp.float32), axis=-1),
                    slot.reshape(-1))
    return dy, None, dweight.reshape(T, k).astype(weight.dtype), None


combine_rows.defvjp(_combine_fwd, _combine_bwd)


def add_rows(values, index, num_rows: int):
    """float32 [num_rows, D]: the rows of values [*index.shape, D] summed into
    the rows index names (a scatter-add; its gradient is a gather)."""
    out = jnp.zeros((num_rows, *values.shape[index.ndim:]), jnp.float32)
    return out.at[index].add(values.astype(jnp.float32))


@jax.custom_vjp
def gather_rows(x, index):
    """x[index] -> [*index.shape, D] for in-range index whose rows repeat any
    number of times; the gradient sums the copies in float32 (add_rows)
    whatever x's dtype."""
    return jnp.take(x, index, axis=0)


def _gather_rows_fwd(x, index):
    return gather_rows(x, index), (index, x.shape[0])


def _gather_rows_bwd(res, g):
    index, num_rows = res
    return add_rows(g, index, num_rows).astype(g.dtype), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
