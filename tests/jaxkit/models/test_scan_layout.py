"""Scanned layers with an unrolled prefix (a dense first layer before MoE
layers): the scanned model equals the unrolled one, forward and gradients,
and unscan_layers maps it back."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ConfigError, ModelConfig, MoEConfig
from jaxkit.models import Transformer, unscan_layers
from jaxkit.models.transformer import scan_layout

# layer 0 dense, layers 1-4 MoE: prefix 1, period 1, four repeats
CFG = ModelConfig(vocab_size=31, d_model=16, num_layers=5, num_heads=2, mlp_hidden=24,
                  max_seq_len=16, compute_dtype="float32",
                  moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, first_layer=1,
                                gmm_implementation="xla"))


def _loss_and_grads(cfg, tokens):
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits, aux = nnx.merge(graphdef, params, rest)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["moe_loss"]

    return model, *jax.value_and_grad(loss)(params)


def test_layouts():
    blocks = lambda cfg: nnx.eval_shape(
        lambda: Transformer(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))).blocks
    assert scan_layout(list(blocks(CFG))) == (1, 1)
    every2 = dataclasses.replace(CFG, num_layers=7, moe=dataclasses.replace(CFG.moe, every=2))
    assert scan_layout(list(blocks(every2))) == (1, 2)  # D (M D)(M D)(M D)
    none = dataclasses.replace(CFG, num_layers=3, moe=dataclasses.replace(CFG.moe, every=2))
    assert scan_layout(list(blocks(none))) is None  # D M D
    with pytest.raises(ConfigError, match=r"scan_layers.*num_layers=3"):
        nnx.eval_shape(lambda: Transformer(dataclasses.replace(none, scan_layers=True),
                                           rngs=nnx.Rngs(0)))


def test_prefix_scan_matches_unrolled_model():
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, CFG.vocab_size)
    _, ref_loss, ref_grads = _loss_and_grads(CFG, tokens)
    scanned, loss, grads = _loss_and_grads(dataclasses.replace(CFG, scan_layers=True), tokens)
    assert len(scanned.prefix) == 1 and not scanned.prefix[0].is_moe
    assert grads["blocks"]["layers"][0]["attn"]["q"]["kernel"].shape == (4, 16, 16)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    unstacked = {0: grads["prefix"][0]} | {
        1 + i: jax.tree.map(lambda a: a[i], grads["blocks"]["layers"][0]) for i in range(4)}
    ref = jax.tree_util.tree_flatten_with_path(ref_grads["blocks"])[0]
    got = jax.tree_util.tree_flatten_with_path(unstacked)[0]
    for (path, r), (_, g) in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    flat = unscan_layers(scanned)
    np.testing.assert_allclose(flat(tokens)[0], scanned(tokens)[0], rtol=1e-6, atol=1e-6)
