"""The spec of the row gather: out[m] = sum_j weight[m, j] * src[index[m, j]].

src [N, D]; index int [M, r] (or [M]: r = 1); entries count as jnp.take
counts them (a negative one from the end) and one outside [-N, N) selects a
zero row, so N marks an empty slot. weight [M, r] (None: ones). Products and
sums are float32; the result is cast to out_dtype (None: src's dtype). With
r = 1 and no weight this is a plain gather of rows; with r > 1 it sums each
row's r sources (a token's k expert outputs, or the k copies of its
gradient)."""
from __future__ import annotations

import jax.numpy as jnp


def row_gather(src, index, weight=None, out_dtype=None):
    out_dtype = src.dtype if out_dtype is None else out_dtype
    index = index[:, None] if index.ndim == 1 else index
    rows = jnp.take(src, index, axis=0, mode="fill", fill_value=0)  # [M, r, D]
    if weight is not None:
        rows = weight.astype(jnp.float32)[..., None] * rows.astype(jnp.float32)
    elif rows.shape[1] == 1:
        return rows[:, 0].astype(out_dtype)
    return jnp.sum(rows, axis=1, dtype=jnp.float32).astype(out_dtype)


def row_gather_bytes(rows: int, sources: int, dim: int, itemsize: int, out_itemsize: int,
                     weighted: bool) -> int:
    """Bytes a call must move at least: every gathered source row read once,
    the output written, the index (and weights) read."""
    per_source = 4 + (4 if weighted else 0)
    return rows * sources * (dim * itemsize + per_source) + rows * dim * out_itemsize
