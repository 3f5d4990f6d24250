"""linear_cross_entropy (output projection fused into the loss) against the
plain cross_entropy of materialised logits: loss, metrics and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.train.loss import cross_entropy, linear_cross_entropy, num_chunks


@pytest.mark.parametrize("B,S,D,V,chunk_tokens,z_loss,seed", [
    (3, 10, 16, 37, 8, 0.0, 0),      # 5 chunks of 2 positions
    (2, 12, 24, 53, 10_000, 1e-3, 1),  # one chunk
    (1, 7, 8, 11, 3, 0.01, 2),        # prime length: chunks of 1 position
])
def test_matches_materialised_logits(B, S, D, V, chunk_tokens, z_loss, seed):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (B, S, D))
    w = 0.3 * jax.random.normal(k[1], (D, V))
    targets = jax.random.randint(k[2], (B, S), 0, V)
    # a third of the targets are the argmax, so accuracy is not trivially 0
    hit = jax.random.uniform(k[3], (B, S)) < 0.33
    targets = jnp.where(hit, jnp.argmax(jnp.einsum("bsd,dv->bsv", x, w), -1), targets)
    mask = (jax.random.uniform(k[4], (B, S)) > 0.3).astype(jnp.float32)

    def plain(x, w):
        return cross_entropy(jnp.einsum("bsd,dv->bsv", x, w), targets, mask, z_loss=z_loss)

    def fused(x, w):
        return linear_cross_entropy(x, w, targets, mask, z_loss=z_loss, chunk_tokens=chunk_tokens)

    (l1, m1), g1 = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(x, w)
    (l2, m2), g2 = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(x, w)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert 0 < float(m1["accuracy"]) < 1
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_gradients_close_to_float32():
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (2, 16, 32))
    w = 0.2 * jax.random.normal(k[1], (32, 101))
    targets = jax.random.randint(k[2], (2, 16), 0, 101)
    f = lambda x, w: linear_cross_entropy(x, w, targets, chunk_tokens=8)[0]
    l32, g32 = jax.value_and_grad(f, argnums=(0, 1))(x, w)
    l16, g16 = jax.value_and_grad(f, argnums=(0, 1))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(l16, l32, rtol=2e-2)
    for a, b in zip(g16, g32):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=0.05 * float(jnp.abs(b).max()))


def test_bfloat16_logits_close_to_float32_logits():
    """logits_dtype=bfloat16 stores each chunk's logits rounded to bf16 before
    the float32 softmax: loss and gradients within bf16 rounding of float32."""
    k = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k[0], (3, 10, 24)).astype(jnp.bfloat16)
    w = (0.3 * jax.random.normal(k[1], (24, 97))).astype(jnp.bfloat16)
    targets = jax.random.randint(k[2], (3, 10), 0, 97)
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        f = lambda x, w: linear_cross_entropy(x, w, targets, chunk_tokens=12, z_loss=1e-3,
                                              logits_dtype=dtype)[0]
        grads[dtype] = jax.value_and_grad(f, argnums=(0, 1))(x, w)
    (l32, g32), (l16, g16) = grads[jnp.float32], grads[jnp.bfloat16]
    np.testing.assert_allclose(l16, l32, rtol=4e-3)
    for a, b in zip(g16, g32):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.abs(b).max()))


def test_chunks_divide_sequence():
    assert num_chunks(8, 2048, 8192) == 2
    assert num_chunks(1, 7, 3) == 7
    assert num_chunks(4, 10, 1 << 20) == 1


def test_bad_shapes_name_them():
    with pytest.raises(ValueError, match=r"x \(2, 3\)"):
        linear_cross_entropy(jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.zeros((2, 3), jnp.int32))


def test_fused_training_follows_materialised_logits_over_100_steps(monkeypatch):
    """A bf16 model trained 100 steps with the output head fused into the loss
    follows the loss curve of the same model trained on materialised logits,
    within bf16 noise."""
    from jaxkit.models import Transformer
    from training_curve import loss_curve, repeats_batch, tiny_config

    cfg = tiny_config("model.tie_embeddings=false")
    batch = repeats_batch(67, 24)
    fused = loss_curve(cfg, batch)
    # the plain path: the model's logits, then cross_entropy
    monkeypatch.setattr(Transformer, "output_projection", lambda self: None)
    plain = loss_curve(cfg, batch)
    assert plain[-1] < 0.5 * plain[0]  # it learns, so the comparison means something
    np.testing.assert_allclose(fused, plain, rtol=0.03, atol=0.02)


def test_bfloat16_logits_training_follows_float32_logits_over_100_steps():
    """train.logits_dtype=bfloat16 follows the float32-logits loss curve of
    the same model within bf16 noise."""
    from training_curve import loss_curve, repeats_batch, tiny_config

    batch = repeats_batch(67, 24)
    f32 = loss_curve(tiny_config("model.tie_embeddings=false"), batch)
    bf16 = loss_curve(tiny_config("model.tie_embeddings=false", "train.logits_dtype=bfloat16"), batch)
    assert f32[-1] < 0.5 * f32[0]
    np.testing.assert_allclose(bf16, f32, rtol=0.03, atol=0.02)
