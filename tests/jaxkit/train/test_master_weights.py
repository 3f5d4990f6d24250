"""optimizer.master_weights: bfloat16 parameters updated through float32
copies in the optimizer state. The master weights follow AdamW on float32
parameters; the parameters are exactly the master weights rounded; updates
too small for bfloat16 still accumulate; a model trained so follows the
float32-parameter model's loss curve; a resumed run equals a straight one
bit for bit; a bf16 embedding table's gradient sums in float32."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkit.config import ConfigError, load_config
from jaxkit.train.master_weights import MasterWeightsState, apply_update, with_master_weights


def _grads(key, like):
    return jax.tree.map(lambda p: jax.random.normal(key, p.shape, jnp.bfloat16), like)


def test_master_weights_follow_float32_adamw_and_round_into_the_parameters():
    keys = jax.random.split(jax.random.key(0), 12)
    params = {"w": jax.random.normal(keys[0], (5, 7), jnp.bfloat16),
              "b": jax.random.normal(keys[1], (3,), jnp.bfloat16)}
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    opt = with_master_weights(inner)
    state = opt.init(params)
    want = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    want_state = inner.init(want)
    for key in keys[2:]:
        grads = _grads(key, params)
        params, state = apply_update(opt, grads, state, params)
        want, want_state = apply_update(inner, jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                                        want_state, want)
    assert isinstance(state, MasterWeightsState)
    for name in params:
        assert params[name].dtype == jnp.bfloat16 and state.master[name].dtype == jnp.float32
        np.testing.assert_allclose(state.master[name], want[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(params[name], state.master[name].astype(jnp.bfloat16))


def test_updates_below_bfloat16_resolution_accumulate():
    """1e-4 a step against weights of 1 (bf16 spacing 2**-7 ~ 7.8e-3): rounded
    straight into bf16 nothing moves; through the master weights 100 steps
    move every weight by 1e-2."""
    params = {"w": jnp.ones((8,), jnp.bfloat16)}
    step = optax.sgd(1e-4)
    grads = {"w": jnp.ones((8,), jnp.bfloat16)}
    plain, plain_state = params, step.init(params)
    opt = with_master_weights(step)
    master, master_state = params, opt.init(params)
    for _ in range(100):
        plain, plain_state = apply_update(step, grads, plain_state, plain)
        master, master_state = apply_update(opt, grads, master_state, master)
    np.testing.assert_array_equal(plain["w"], params["w"])
    np.testing.assert_allclose(master_state.master["w"], 0.99, rtol=1e-5)
    np.testing.assert_array_equal(master["w"], jnp.full((8,), 0.99, jnp.float32).astype(jnp.bfloat16))


def test_master_weights_need_low_precision_parameters():
    with pytest.raises(ConfigError, match="model.param_dtype is 'float32'"):
        load_config(None, ["optimizer.master_weights=true"])


def test_training_follows_float32_parameters_over_100_steps():
    from training_curve import loss_curve, repeats_batch, tiny_config

    batch = repeats_batch(67, 24)
    reference = loss_curve(tiny_config(), batch)
    master = loss_curve(tiny_config("model.param_dtype=bfloat16", "optimizer.master_weights=true"),
                        batch)
    assert reference[-1] < 0.5 * reference[0]
    np.testing.assert_allclose(master, reference, rtol=0.03, atol=0.02)


def test_resume_with_master_weights_is_exact(tmp_path):
    """6 steps straight (checkpoints at 3 and 6) against the same run resumed
    from its step-3 checkpoint: parameters and master weights bit for bit."""
    from multidevice import TINY

    from jaxkit.run.trainer import Trainer
    cfg = load_config(None, TINY + ["model.param_dtype=bfloat16", "optimizer.master_weights=true",
                                    "checkpoint.every=3", "checkpoint.keep_last=2"])
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    resumed = Trainer(cfg, tmp_path / "resumed")
    assert resumed.fit(resume=True)["step"] == 6
    want = (straight.state["params"], straight.state["opt_state"].master)
    got = (resumed.state["params"], resumed.state["opt_state"].master)
    leaves = jax.tree.leaves(got)
    assert any(x.dtype == jnp.bfloat16 for x in leaves) and any(x.dtype == jnp.float32 for x in leaves)
    for g, w in zip(leaves, jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def test_bf16_embedding_gradient_sums_repeated_tokens_in_float32():
    """4096 lookups of one token, each with cotangent 1: summed in bf16 the
    row's gradient would stall at 256 (bf16 cannot add 1 to 256); in float32
    it is 4096."""
    from flax import nnx

    from jaxkit.config import ModelConfig
    from jaxkit.models import Transformer
    cfg = ModelConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, mlp_hidden=16,
                      max_seq_len=8, param_dtype="bfloat16", compute_dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.zeros((64, 64), jnp.int32)

    def total(params):
        return nnx.merge(graphdef, params, rest)._embed(tokens).astype(jnp.float32).sum()
    grad = jax.grad(total)(params)["embed"][...]
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad[0], np.float32), 4096.0)
