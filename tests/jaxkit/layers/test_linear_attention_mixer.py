"""The gated linear attention mixer in the decoder: the hybrid layout
(softmax attention in every k-th layer), scanned layers equal to unrolled
ones, the kernel and the jnp core agreeing through the layer, and the
config checks (generation: tests/jaxkit/generate/test_linear_generation.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ConfigError, LinearAttentionConfig, ModelConfig, load_config
from jaxkit.layers.attention import Attention
from jaxkit.layers.linear_attention import LinearAttention
from jaxkit.models import Transformer, unscan_layers
from jaxkit.models.transformer import scan_layout

CFG = ModelConfig(vocab_size=29, d_model=32, num_layers=4, num_heads=2, mlp_hidden=24,
                  max_seq_len=40, compute_dtype="float32", mixer="linear", softmax_every=2,
                  linear_attention=LinearAttentionConfig(chunk_size=16, implementation="xla"))
TOKENS = jax.random.randint(jax.random.key(1), (2, 37), 0, CFG.vocab_size)


def test_hybrid_layout_puts_softmax_in_every_kth_layer():
    model = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    kinds = [type(block.attn) for block in model.blocks]
    assert kinds == [LinearAttention, Attention, LinearAttention, Attention]
    assert scan_layout(list(model.blocks)) == (0, 2)
    linear = model.blocks[0].attn
    assert linear.q.kernel.get_metadata()["logical_axes"] == ("embed", "heads")
    assert linear.decay_bias.get_metadata()["logical_axes"] == ("heads",)
    assert linear.decay.kernel.shape == (32, 2)  # one decay per head
    per_key = dataclasses.replace(CFG, softmax_every=0, linear_attention=dataclasses.replace(
        CFG.linear_attention, decay="per_key"))
    model = nnx.eval_shape(lambda: Transformer(per_key, rngs=nnx.Rngs(0)))
    assert all(isinstance(b.attn, LinearAttention) for b in model.blocks)
    assert model.blocks[0].attn.decay.kernel.shape == (32, 32)


def _logits(model):
    return model(TOKENS)[0]


def test_scanned_hybrid_model_equals_unrolled():
    scanned = Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(4))
    unrolled = unscan_layers(scanned)
    np.testing.assert_allclose(_logits(scanned), _logits(unrolled), rtol=1e-5, atol=1e-5)


def test_kernel_and_jnp_core_agree_through_the_layer():
    """The interpreted Pallas kernel (implementation 'blockspec') and the jnp
    core: logits and parameter gradients (float32; tolerance as the kernel tests')."""
    def loss_and_grads(implementation):
        cfg = dataclasses.replace(CFG, linear_attention=dataclasses.replace(
            CFG.linear_attention, implementation=implementation))
        model = Transformer(cfg, rngs=nnx.Rngs(5))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(TOKENS)[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        return jax.value_and_grad(loss)(params)

    loss_x, grads_x = loss_and_grads("xla")
    loss_k, grads_k = loss_and_grads("blockspec")
    assert jnp.isfinite(loss_x) and abs(float(loss_x - loss_k)) < 1e-5
    for a, b in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_k)):
        assert float(jnp.linalg.norm(a - b)) <= 5e-5 * float(jnp.linalg.norm(a)) + 1e-7


@pytest.mark.parametrize("overrides,message", [
    (["model.softmax_every=2"], r"model.softmax_every \(2\) .* needs model.mixer 'linear'"),
    (["model.mixer=linear", "model.softmax_every=9"], r"exceeds model.num_layers \(4\)"),
    (["model.linear_attention.chunk_size=48"], "chunk_size must be a power of two, got 48"),
    (["model.linear_attention.chunk_size=8"], "chunk_size must be >= 16, got 8"),
    (["model.mixer=linear", "model.linear_attention.decay=per_key",
      "model.linear_attention.implementation=pallas"], "decay 'per_key' runs on implementation"),
    (["model.mixer=linear", "data.document_mask=true"], "document_mask needs segment ids"),
])
def test_config_refuses_bad_mixer_settings(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
