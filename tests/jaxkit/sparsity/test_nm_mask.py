"""N:M masks: exactly n kept per group of m along the grouped axis, the
largest magnitudes, ties to the lower index; bad n, m in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.sparsity import check_nm, nm_mask, nm_prune


def reference_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """The n largest |w| of each group of m along axis, by a stable sort
    (equal magnitudes: the lower index first)."""
    a = np.moveaxis(np.abs(w), axis, -1)
    groups = a.reshape(-1, m)
    keep = np.zeros_like(groups, bool)
    for row, g in enumerate(groups):
        keep[row, np.argsort(-g, kind="stable")[:n]] = True
    return np.moveaxis(keep.reshape(a.shape), -1, axis)


@pytest.mark.parametrize("shape, n, m, axis", [
    ((12, 5), 2, 4, -2),  # a Linear kernel [in, out], 2:4
    ((3, 20, 7), 2, 4, -2),  # stacked layers [L, in, out]
    ((6, 9), 1, 3, 0),
    ((5, 16), 3, 8, 1),
    ((7, 4), 1, 2, 1),
])
def test_mask_keeps_the_n_largest_of_every_group(shape, n, m, axis):
    w = np.asarray(jax.random.normal(jax.random.key(sum(shape)), shape))
    mask = np.asarray(nm_mask(jnp.asarray(w), n, m, axis))
    assert mask.shape == w.shape
    per_group = np.moveaxis(mask, axis, -1).reshape(-1, m).sum(-1)
    assert (per_group == n).all()
    np.testing.assert_array_equal(mask, reference_mask(w, n, m, axis))
    pruned = np.asarray(nm_prune(jnp.asarray(w), n, m, axis))
    np.testing.assert_array_equal(pruned, np.where(mask, w, 0.0))


def test_ties_keep_exactly_n_lower_indices_first():
    # columns: all equal; a tie of +-1 for the second place; a tie of 0.5 for
    # the second place; all zero
    w = np.array([[1.0, 0.5, 0.5, 0.0],
                  [1.0, -1.0, 0.25, 0.0],
                  [1.0, 1.0, 2.0, 0.0],
                  [1.0, 2.0, 0.5, 0.0]], np.float32)
    mask = np.asarray(nm_mask(jnp.asarray(w), 2, 4, axis=0))
    np.testing.assert_array_equal(mask, np.array([[1, 0, 1, 1],
                                                  [1, 1, 0, 1],
                                                  [0, 0, 1, 0],
                                                  [0, 1, 0, 0]], bool))
    np.testing.assert_array_equal(mask, reference_mask(w, 2, 4, 0))


def test_bfloat16_weights():
    w = jax.random.normal(jax.random.key(3), (16, 3)).astype(jnp.bfloat16)
    pruned = nm_prune(w, 2, 4)
    assert pruned.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(nm_mask(w, 2, 4)),
                                  reference_mask(np.asarray(w.astype(jnp.float32)), 2, 4, -2))


@pytest.mark.parametrize("n, m, size, message", [
    (2, 2, 8, "N:M sparsity needs 1 <= n < m, got n=2, m=2"),
    (0, 4, 8, "N:M sparsity needs 1 <= n < m, got n=0, m=4"),
    (2, 4, 10, "N:M sparsity: m=4 does not divide the grouped dimension of size 10"),
])
def test_bad_n_m_is_one_line(n, m, size, message):
    with pytest.raises(ValueError) as err:
        check_nm(n, m, size)
    assert str(err.value) == message
    with pytest.raises(ValueError, match="N:M sparsity"):
        nm_mask(jnp.ones((size, 3)), n, m, axis=0)
