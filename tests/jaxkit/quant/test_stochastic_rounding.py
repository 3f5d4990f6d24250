"""Stochastic rounding: every draw is one of the two grid values around the
input, the mean over draws is the input (unbiased, also through MX/NV block
scales, which SR rounds up so nothing saturates), a Linear's output gradient
is rounded with its layer's key, advanced each training call, and a tiny FP4
QAT run with stochastic gradients trains reproducibly. Bad settings are one
line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ConfigError, QuantConfig, load_config
from jaxkit.layers import Linear
from jaxkit.models import Transformer
from jaxkit.quant import dequantize, fake_quant, get_format, quantize
from jaxkit.quant.core import ungroup
from jaxkit.quant.formats import E2M1, E4M3, INT4, MXINT8_ELEMENT
from jaxkit.quant.layer import QuantRng
from jaxkit.quant.numerics import round_to_element
from jaxkit.run.build import check_config
from jaxkit.run.trainer import Trainer

DRAWS = 4096
# The mean of DRAWS draws of {lo, hi} has standard deviation at most
# (hi - lo) / (2 sqrt(DRAWS)); 6 of those bound it with failure odds ~1e-9.
SIGMAS = 6.0


def grid(element) -> np.ndarray:
    """Every value of an element type, from its definition."""
    if element.kind == "int":
        return np.arange(element.qmin, element.qmax + 1) * element.step
    sub = np.arange(2 ** element.mbits) * 2.0 ** (element.min_exp - element.mbits)
    normal = [(1 + k / 2 ** element.mbits) * 2.0 ** e
              for e in range(element.min_exp, element.emax + 1) for k in range(2 ** element.mbits)]
    pos = np.unique(np.concatenate([sub, [v for v in normal if v <= element.max]]))
    return np.unique(np.concatenate([-pos, pos]))


def check_unbiased_between_neighbours(x, draws, values):
    """draws [DRAWS, ...] of x: each the grid value (among values) just below
    or just above x, their mean x within SIGMAS standard deviations."""
    x, draws = np.asarray(x, np.float64), np.asarray(draws, np.float64)
    below = values[np.searchsorted(values, x, side="right") - 1]
    above = values[np.searchsorted(values, x, side="left")]
    assert ((draws == below) | (draws == above)).all()
    tolerance = SIGMAS * (above - below) / (2 * np.sqrt(DRAWS))
    assert (np.abs(draws.mean(0) - x) <= tolerance).all()


@pytest.mark.parametrize("element", [E2M1, E4M3, INT4, MXINT8_ELEMENT], ids=lambda e: e.name)
def test_element_rounding_is_unbiased_between_neighbours(element):
    values = grid(element)
    kx, kn = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (200,), minval=-element.max, maxval=element.max)
    x = jnp.concatenate([x, jnp.asarray(values[::3], jnp.float32)])  # grid points stay put
    noise = jax.random.uniform(kn, (DRAWS, *x.shape))
    draws = jax.vmap(lambda u: round_to_element(x, element, "stochastic", u))(noise)
    check_unbiased_between_neighbours(x, draws, values)
    np.testing.assert_array_equal(draws[:, 200:], jnp.broadcast_to(x[200:], draws[:, 200:].shape))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "nvint4", "mxfp8", "int8"])
def test_format_rounding_is_unbiased(fmt):
    """Element codes against x / scale (the scales do not depend on the noise),
    and the dequantised mean against x."""
    x = jax.random.normal(jax.random.key(1), (4, 64)) * jnp.array([[1.0], [10.0], [1e-3], [3.0]])
    keys = jax.random.split(jax.random.key(2), DRAWS)
    draws = jax.vmap(lambda k: quantize(x, fmt, rounding="stochastic", key=k))(keys)
    scale = draws.scale if draws.tensor_scale is None \
        else draws.scale * draws.tensor_scale[:, None, None, None]
    np.testing.assert_array_equal(scale, jnp.broadcast_to(scale[0], scale.shape))
    t = x.reshape(scale.shape[1:-1] + (-1,)) * (1.0 / scale[0])
    element = get_format(fmt).element
    # nothing saturates but by the float rounding of scale products (NV: bs * ts)
    assert float(jnp.abs(t).max()) <= element.max * (1 + 1e-6)
    t = jnp.clip(t, -element.max, element.max)
    check_unbiased_between_neighbours(t, draws.codes, grid(element))
    deq = jax.vmap(dequantize)(draws)
    step = np.asarray(ungroup(jax.tree.map(lambda a: a[0], draws), scale[0]))
    element_max_step = np.max(np.diff(grid(element)))
    tolerance = SIGMAS * element_max_step * step / (2 * np.sqrt(DRAWS))
    assert (np.abs(np.asarray(deq.mean(0)) - np.asarray(x)) <= tolerance + 1e-6 * np.abs(x)).all()


def test_mx_scale_rounds_up_with_stochastic_rounding():
    x = jnp.full((1, 32), 7.0)  # OCP scale 1: 7 saturates to 6; SR takes scale 2 (7 -> 6 or 8)
    assert float(quantize(x, "mxfp4").scale.max()) == 1.0
    q = quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(0))
    assert float(q.scale.max()) == 2.0


def test_same_key_same_draw():
    x = jax.random.normal(jax.random.key(3), (8, 32))
    a, b, c = (fake_quant(x, "mxfp4", rounding="stochastic", key=jax.random.key(k))
               for k in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rounding="stochastic"), "rounding 'stochastic' needs a PRNG key"),
    (dict(key=jax.random.key(0)), "a PRNG key is only used with rounding 'stochastic'"),
    (dict(rounding="down"), "unknown rounding 'down'; choose one of ('nearest', 'stochastic')"),
    (dict(rounding="stochastic", key=jax.random.key(0), scale_method="mse"),
     "rounding 'stochastic' is unbiased only without clipping: it needs scale_method 'absmax' "
     "and no precomputed amax, got scale_method 'mse'"),
])
def test_bad_rounding_is_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        quantize(jnp.ones((2, 32)), "mxfp4", **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError, match="needs a symmetric format, got 'int8_asym'"):
        quantize(jnp.ones((2, 32)), "int8_asym", rounding="stochastic", key=jax.random.key(0))


def test_linear_rounds_its_output_gradient_with_its_key():
    # no weight_format: dW = x_q^T dy_q without the weight's clipped straight-through mask
    quant = QuantConfig(mode="qat", activation_format="mxfp4", gradient_format="nvfp4",
                        gradient_rounding="stochastic", targets=("mlp",))
    layer = Linear(64, 32, axes=("embed", "mlp"), rngs=nnx.Rngs(0), compute_dtype=jnp.float32,
                   quant=quant, target="mlp")
    x = jax.random.normal(jax.random.key(1), (6, 64))
    dy = jax.random.normal(jax.random.key(2), (6, 32))
    rng = layer.quantizer.gradient_rng
    stored = rng[...]
    grad = nnx.grad(lambda lin: jnp.sum(lin(x) * dy))(layer)["kernel"][...]
    _, sub = jax.random.split(jax.random.wrap_key_data(stored))
    xq = fake_quant(x, "mxfp4", axis=-1)
    expected = xq.T @ fake_quant(dy, "nvfp4", axis=-1, rounding="stochastic", key=sub)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rng[...], stored)  # eval mode: the key stays
    layer.train()
    layer(x)
    assert not np.array_equal(rng[...], stored)  # training: advanced every call
    assert isinstance(rng, QuantRng)


@pytest.mark.parametrize("overrides, message", [
    (["model.quant.gradient_rounding=stochastic"],
     "model.quant: gradient_rounding 'stochastic' needs a gradient_format"),
    (["model.quant.gradient_rounding=stochastic", "model.quant.gradient_format=int8_asym"],
     "model.quant: gradient_rounding 'stochastic' needs a symmetric gradient_format, got "
     "'int8_asym'"),
])
def test_bad_gradient_rounding_config_is_one_line(overrides, message):
    cfg = load_config(None, ["model.quant.mode=qat", "model.quant.weight_format=mxfp4",
                             *overrides])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value) == message


def test_moe_experts_refuse_stochastic_gradients():
    cfg = load_config(None, ["model.quant.mode=qat", "model.quant.weight_format=mxfp4",
                             "model.quant.gradient_format=nvfp4",
                             "model.quant.gradient_rounding=stochastic", "model.moe.num_experts=4"])
    with pytest.raises(ValueError) as err:
        nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    assert str(err.value) == ("gradient_rounding 'stochastic' is not supported for MoE experts "
                              "(remove 'experts' from model.quant.targets, or use "
                              "gradient_rounding 'nearest')")


def test_unknown_gradient_rounding_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.quant.gradient_rounding=random"])
    assert str(err.value) == ("model.quant.gradient_rounding: 'random' is not one of "
                              "['nearest', 'stochastic']")


FP4_RUN = ["model.vocab_size=64", "model.d_model=64", "model.num_layers=2", "model.num_heads=2",
           "model.mlp_hidden=128", "model.max_seq_len=32", "model.compute_dtype=float32",
           "data.kind=mqar", "data.seq_len=32", "data.batch_size=8", "data.mqar_vocab_size=64",
           "train.steps=6", "train.eval_every=0", "train.progress=false", "train.log_every=1",
           "checkpoint.enabled=false", "model.quant.mode=qat", "model.quant.hadamard=true",
           "model.quant.weight_format=mxfp4", "model.quant.activation_format=mxfp4",
           "model.quant.gradient_format=mxfp4"]


def fp4_losses(tmp_path, name, rounding):
    cfg = load_config(None, FP4_RUN + [f"model.quant.gradient_rounding={rounding}"])
    Trainer(cfg, tmp_path / name).fit()
    records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in records if json.loads(r)["split"] == "train"]


def test_fp4_training_with_stochastic_gradients(tmp_path):
    first = fp4_losses(tmp_path, "a", "stochastic")
    assert len(first) == 6 and np.isfinite(first).all()
    assert fp4_losses(tmp_path, "b", "stochastic") == first  # the keys come from the seed
    nearest = fp4_losses(tmp_path, "c", "nearest")
    assert nearest[0] == first[0]  # the same forward before any update
    assert nearest[1:] != first[1:]  # then the stochastic gradients' updates
