"""Sampling: greedy is argmax, the top-k and top-p filters keep the right
tokens, draws follow the filtered distribution and repeat with the seed."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxkit.generate.sampling import (greedy, limit_vocab, sample, sequence_keys, step_keys,
                                      top_k_filter, top_p_filter)

LOGITS = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3], [0.05, 0.05, 0.6, 0.3]]))


def kept(filtered):
    return np.isfinite(np.asarray(filtered))


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 37))
    np.testing.assert_array_equal(greedy(logits), np.argmax(logits, axis=-1))
    assert greedy(logits).dtype == jnp.int32


def test_top_k_keeps_the_k_largest_per_row():
    np.testing.assert_array_equal(kept(top_k_filter(LOGITS, jnp.array([2, 1]))),
                                  [[0, 1, 0, 1], [0, 0, 1, 0]])
    assert kept(top_k_filter(LOGITS, jnp.array(0))).all()  # 0: off
    assert kept(top_k_filter(LOGITS, jnp.array(9))).all()  # more than the vocabulary


def test_top_p_keeps_the_smallest_set_reaching_p():
    # row 0 ranks 0.4, 0.3, 0.2, 0.1; row 1 ranks 0.6, 0.3, 0.05, 0.05
    np.testing.assert_array_equal(kept(top_p_filter(LOGITS, jnp.array(0.5))),
                                  [[0, 1, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(kept(top_p_filter(LOGITS, jnp.array([0.75, 0.95]))),
                                  [[0, 1, 1, 1], [1, 1, 1, 1]])  # ties at the threshold stay
    np.testing.assert_array_equal(kept(top_p_filter(LOGITS, jnp.array(1e-6))),
                                  [[0, 1, 0, 0], [0, 0, 1, 0]])  # the most likely always
    assert kept(top_p_filter(LOGITS, jnp.array(1.0))).all()


def test_limit_vocab():
    np.testing.assert_array_equal(kept(limit_vocab(LOGITS, 3)), [[1, 1, 1, 0]] * 2)


def _draws(logits, n, seed=0, **kw):
    keys = step_keys(jnp.repeat(sequence_keys(seed, 1), n, 0), jnp.arange(n))
    rows = jnp.broadcast_to(logits, (n, logits.shape[-1]))
    return np.asarray(sample(rows, keys, **kw))


def test_draws_follow_the_filtered_distribution():
    settings = dict(temperature=jnp.float32(1.0), top_k=jnp.int32(3), top_p=jnp.float32(0.85))
    draws = _draws(LOGITS[0], 4000, **settings)
    # top-k 3 keeps 0.4, 0.3, 0.2; top-p 0.85 of those (0.44, 0.33, 0.22) keeps all three
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0, 4 / 9, 2 / 9, 3 / 9], atol=0.03)
    # a low temperature sharpens towards the argmax
    cold = _draws(LOGITS[0], 500, temperature=jnp.float32(0.05), top_k=0, top_p=1.0,
                  filtered=False)
    assert np.mean(cold == 1) > 0.95


def test_seed_reproducibility():
    kw = dict(temperature=jnp.float32(1.0), top_k=jnp.int32(0), top_p=jnp.float32(1.0))
    logits = jax.random.normal(jax.random.key(1), (50,))
    np.testing.assert_array_equal(_draws(logits, 64, seed=3, **kw), _draws(logits, 64, seed=3, **kw))
    assert (_draws(logits, 64, seed=3, **kw) != _draws(logits, 64, seed=4, **kw)).any()
    # a sequence's keys depend on the seed and its index, not on the batch size
    np.testing.assert_array_equal(jax.random.key_data(sequence_keys(7, 2)),
                                  jax.random.key_data(sequence_keys(7, 5)[:2]))
