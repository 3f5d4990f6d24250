"""model.attention.sparse: the config's checks, which layers attend
block-sparsely, and a model with sparse layers in training (forward and
gradients), under scan_layers and in generation (prefill sparse as in
training, decode steps dense). Float32, reference attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ConfigError, load_config
from jaxkit.generate.cache import empty_caches
from jaxkit.models import Transformer

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_hidden=48", "model.vocab_size=61", "model.max_seq_len=96", "data.seq_len=96",
        "model.compute_dtype=float32", "model.attention.implementation=xla",
        "model.attention.sparse.block_size=16"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 90)))


def sparse(*overrides):
    return load_config(None, TINY + list(overrides))


@pytest.mark.parametrize("overrides,match", [
    (["model.attention.sparse.policy=infllm_v2", "model.attention.sparse.block_size=48"],
     "block_size must be a power of two, got 48"),
    (["model.attention.sparse.policy=proxy", "model.attention.implementation=cudnn"],
     "no 'cudnn' implementation"),
    (["model.attention.sparse.policy=window_sinks", "model.attention.sliding_window=8"],
     "does not combine with model.attention.sliding_window"),
    (["model.attention.sparse.policy=infllm_v2", "model.attention.sparse.window=40",
      "model.attention.sparse.top_k_blocks=3"], "top_k_blocks \\(3\\) must cover the 7"),
    (["model.attention.sparse.policy=proxy", "model.attention.sparse.proxy_heads=3"],
     "proxy_heads \\(3\\) exceeds the 2 query heads"),
    (["model.attention.sparse.policy=proxy", "model.attention.sparse.first_layer=2"],
     "selects no softmax layer of the 2"),
    (["model.attention.sparse.policy=proxy", "model.mixer=linear"],
     "selects no softmax layer"),
    (["model.attention.sparse.policy=dense"], "is not one of"),
    (["model.attention.sparse.block_size=8"], "block_size must be >= 16, got 8"),
])
def test_bad_sparse_configs_fail_in_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        sparse(*overrides)
    assert "\n" not in str(e.value)


def test_layers_follow_every_and_first_layer():
    m = sparse("model.num_layers=6", "model.attention.sparse.policy=window_sinks",
               "model.attention.sparse.first_layer=1", "model.attention.sparse.every=2").model
    assert [m.is_sparse_attention_layer(i) for i in range(6)] == [False, True, False, True,
                                                                  False, True]
    hybrid = sparse("model.num_layers=4", "model.mixer=linear", "model.softmax_every=2",
                    "model.attention.sparse.policy=proxy").model
    assert [hybrid.is_sparse_attention_layer(i) for i in range(4)] == [False, True, False, True]
    assert not any(sparse().model.is_sparse_attention_layer(i) for i in range(2))


def logits(cfg, tokens=TOKENS, seed=0):
    model = Transformer(cfg.model, rngs=nnx.Rngs(seed))
    return model, model(tokens)[0]


def test_a_window_covering_everything_is_dense_attention():
    _, dense = logits(sparse())
    _, windowed = logits(sparse("model.attention.sparse.policy=window_sinks",
                                "model.attention.sparse.window=96"))
    np.testing.assert_allclose(np.asarray(windowed), np.asarray(dense), rtol=1e-5, atol=1e-5)
    _, short = logits(sparse("model.attention.sparse.policy=infllm_v2",
                             "model.attention.sparse.dense_below=90"))
    np.testing.assert_allclose(np.asarray(short), np.asarray(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["window_sinks", "infllm_v2", "proxy"])
def test_sparse_layers_train(policy):
    # 3 blocks a query block (proxy: on average over a group's heads)
    window = 32 if policy == "window_sinks" else 16
    cfg = sparse(f"model.attention.sparse.policy={policy}", f"model.attention.sparse.window={window}",
                 "model.attention.sparse.sinks=16", "model.attention.sparse.top_k_blocks=3",
                 "model.attention.sparse.first_layer=1")
    model, out = logits(cfg)
    _, dense = logits(sparse())
    assert model.blocks[0].attn.sparse is None and model.blocks[1].attn.sparse.policy == policy
    # the first 3 blocks of rows see every causal block; later rows see fewer
    np.testing.assert_allclose(np.asarray(out[:, :48]), np.asarray(dense[:, :48]), rtol=1e-5,
                               atol=1e-5)
    assert float(jnp.abs(out[:, 48:] - dense[:, 48:]).max()) > 1e-3

    def loss(model):
        return jnp.mean(model(TOKENS)[0] ** 2)
    grads = nnx.grad(loss)(model)
    norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.linalg.norm(g)), nnx.state(grads)))
    assert all(np.isfinite(norms)) and min(norms) > 0


def test_scanned_layers_match_unrolled():
    over = ["model.num_layers=4", "model.attention.sparse.policy=infllm_v2",
            "model.attention.sparse.every=2", "model.attention.sparse.window=16",
            "model.attention.sparse.sinks=16", "model.attention.sparse.top_k_blocks=3"]
    _, unrolled = logits(sparse(*over))
    model, scanned = logits(sparse(*over, "model.scan_layers=true"))
    assert not hasattr(model, "prefix") or len(model.prefix) == 0
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-5, atol=1e-5)


def test_prefill_is_sparse_and_decode_dense():
    """Prefill attends as training does; decode steps attend to the whole
    cache: after a one-block prompt (where the window is everything) a
    teacher-forced decode gives the dense model's logits."""
    cfg = sparse("model.attention.sparse.policy=window_sinks", "model.attention.sparse.window=16",
                 "model.attention.sparse.sinks=0")
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    dense = Transformer(sparse().model, rngs=nnx.Rngs(0))
    full = jnp.asarray([90, 90], jnp.int32)
    first, _ = model.prefill(TOKENS, full, empty_caches(2, (2, 96), 2, 8, "float32"))
    forward = model(TOKENS)[0]
    dense_forward = dense(TOKENS)[0]
    np.testing.assert_allclose(np.asarray(first), np.asarray(forward[:, -1]), rtol=1e-5,
                               atol=1e-5)
    assert float(jnp.abs(first - dense_forward[:, -1]).max()) > 1e-3

    prompt = 10
    _, caches = model.prefill(TOKENS[:, :prompt], jnp.asarray([prompt, prompt], jnp.int32),
                              empty_caches(2, (2, 96), 2, 8, "float32"))
    for t in range(prompt, 40):
        step, caches = model.decode(TOKENS[:, t:t + 1], jnp.asarray([t + 1, t + 1], jnp.int32),
                                    caches, implementation="xla")
        np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(dense_forward[:, t]),
                                   rtol=1e-5, atol=1e-5, err_msg=f"position {t}")
    assert float(jnp.abs(forward[:, 39] - dense_forward[:, 39]).max()) > 1e-3
