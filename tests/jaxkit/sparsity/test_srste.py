"""SR-STE: the forward multiplies by the pruned weight, the dense weight's
gradient is the pruned weight's gradient plus decay * (1 - mask) * w, as
written out by hand; the same through a sparse Linear, dense and under QAT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import QuantConfig
from jaxkit.layers import Linear
from jaxkit.sparsity import NMSparsity, nm_mask, srste_prune

DECAY = 2e-4


def hand_written_gradient(w, g_pruned, n, m, decay):
    """dL/dW = dL/dW~ + decay * (1 - mask) * W."""
    mask = nm_mask(w, n, m).astype(jnp.float32)
    return g_pruned + decay * (1.0 - mask) * w


@pytest.mark.parametrize("shape, n, m", [((12, 7), 2, 4), ((2, 24, 5), 1, 8), ((9, 3), 2, 3)])
def test_gradient_is_the_srste_formula(shape, n, m):
    kw, kc = jax.random.split(jax.random.key(0))
    w = jax.random.normal(kw, shape)
    c = jax.random.normal(kc, shape)  # dL/dW~ of L = sum(W~ * c)
    pruned, vjp = jax.vjp(lambda v: srste_prune(v, n, m, 0.5), w)
    np.testing.assert_array_equal(pruned, jnp.where(nm_mask(w, n, m), w, 0.0))
    (grad,) = vjp(c)
    np.testing.assert_allclose(grad, hand_written_gradient(w, c, n, m, 0.5), rtol=1e-6, atol=1e-7)
    # decay 0: the plain straight-through estimator
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(srste_prune(v, n, m, 0.0) * c))(w), c)


def linear(sparsity, quant=None):
    layer = Linear(32, 6, axes=("embed", "mlp"), rngs=nnx.Rngs(1), compute_dtype=jnp.float32,
                   quant=quant, target="mlp")
    layer.sparsity = sparsity
    return layer


def test_sparse_linear_forward_and_gradient():
    layer = linear(NMSparsity(2, 4, DECAY))
    x = jax.random.normal(jax.random.key(2), (3, 5, 32))
    w = layer.kernel[...]
    y = layer(x)
    np.testing.assert_allclose(y, x @ jnp.where(nm_mask(w, 2, 4), w, 0.0), rtol=1e-5, atol=1e-6)
    dy = jax.random.normal(jax.random.key(3), y.shape)
    grad = nnx.grad(lambda lin: jnp.sum(lin(x) * dy))(layer)["kernel"][...]
    g_pruned = jnp.einsum("bsi,bso->io", x, dy)
    np.testing.assert_allclose(grad, hand_written_gradient(w, g_pruned, 2, 4, DECAY),
                               rtol=1e-5, atol=1e-6)


def test_sparse_linear_under_qat_quantises_the_pruned_weight():
    quant = QuantConfig(mode="qat", weight_format="mxfp4", targets=("mlp",))
    layer = linear(NMSparsity(2, 4, DECAY), quant)
    dense = linear(None, quant)
    x = jax.random.normal(jax.random.key(4), (4, 32))
    w = layer.kernel[...]
    dense.kernel[...] = jnp.where(nm_mask(w, 2, 4), w, 0.0)
    np.testing.assert_array_equal(layer(x), dense(x))  # zeros stay zeros in mxfp4: still 2:4


def test_nmsparsity_refuses_bad_values():
    with pytest.raises(ValueError, match="n=4, m=4"):
        NMSparsity(4, 4, DECAY)
    with pytest.raises(ValueError, match="SR-STE decay must be >= 0, got -1.0"):
        NMSparsity(2, 4, -1.0)
