"""N:M magnitude masks: in every group of M consecutive elements along an
axis, the N of largest magnitude are kept.

For a Linear weight W [..., in, out] the groups run along the input
(contraction) axis, -2: each output column keeps N of every M consecutive
input features, the layout sparse tensor cores multiply (2:4 on Ampere and
Hopper)."""
from __future__ import annotations

import jax.numpy as jnp


def check_nm(n: int, m: int, size: int | None = None) -> None:
    """Raise ValueError naming the bad value when N:M cannot be applied to a
    dimension of `size` elements (size None: N and M alone)."""
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")
    if size is not None and size % m:
        raise ValueError(f"N:M sparsity: m={m} does not divide the grouped dimension of size {size}")


def nm_mask(w, n: int, m: int, axis: int = -2):
    """Boolean mask of w's shape keeping exactly n elements in each group of
    m consecutive elements along `axis`: those of largest |w|, ties going to
    the lower index (so the count is exact whatever the values)."""
    w = jnp.asarray(w)
    check_nm(n, m, w.shape[axis])
    a = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
    # rank of element i in its group: how many elements outrank it (larger
    # magnitude, or equal magnitude at a lower index); the n with rank < n stay.
    mine, other = groups[..., :, None], groups[..., None, :]
    index = jnp.arange(m)
    earlier = index[None, :] < index[:, None]
    rank = jnp.sum((other > mine) | ((other == mine) & earlier), axis=-1)
    keep = (rank < n).reshape(a.shape)
    return jnp.moveaxis(keep, -1, axis)


def nm_prune(w, n: int, m: int, axis: int = -2):
    """w with all but the n largest-magnitude elements of each group of m
    along `axis` set to zero."""
    return jnp.where(nm_mask(w, n, m, axis), w, jnp.zeros((), w.dtype))


def zero_fraction(w) -> float:
    """Fraction of exactly-zero elements of w (the achieved sparsity)."""
    w = jnp.asarray(w)
    return float(jnp.mean(w == 0)) if w.size else 0.0
