"""Mixture of experts: routers on hand-computed cases, dispatch against a
per-token loop (forward and gradients), capacity dropping, empty experts, the
aux-loss-free bias update, expert parallelism on 8 fake CPU devices (in a
subprocess, which runs this file as a script) and a tiny MoE Transformer."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkit.config import ConfigError, ModelConfig, MoEConfig, QuantConfig, load_config
from jaxkit.layers.moe import MoE, RouterBias, moe_tokens, routers
from jaxkit.layers.moe import dispatch as moe_dispatch
from jaxkit.layers.moe.experts import ExpertWeights, LocalExperts
from jaxkit.layers.moe.metrics import summarize
from jaxkit.models import Transformer
from jaxkit.run.build import split_model
from jaxkit.sharding import activate, resolve_rules
from jaxkit.train.step import make_eval_step, make_train_step

TOL = dict(rtol=2e-5, atol=2e-5)


def model_cfg(d_model=12, quant=QuantConfig(), **moe) -> ModelConfig:
    moe = {"num_experts": 5, "top_k": 2, "expert_hidden": 10, **moe}
    return ModelConfig(d_model=d_model, compute_dtype="float32", moe=MoEConfig(**moe),
                       quant=quant)


def pure(layer):
    return nnx.to_pure_dict(nnx.split(layer)[1])


def forward(layer, x):
    """layer(x) compiled (eager dispatch of many small ops is slow on CPU)."""
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


# ------------------------------------------------------------ routers, by hand

P3 = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125], [0.1, 0.6, 0.2, 0.1]])
SHIFT = np.array([1.0, -2.0, 0.5])  # per-token logit shift: logsumexp = shift


def _stats_of(logits, **moe):
    """Routes `logits` through the real layer path: x = identity rows, so
    x @ router_kernel = logits."""
    T, E = logits.shape
    D = max(T, E)
    x = jnp.eye(T, D, dtype=jnp.float32)
    kernel = jnp.zeros((D, E)).at[:T].set(logits)
    weights = ExpertWeights(*(jnp.zeros(s) for s in [(E, D, 3), (E, D, 3), (E, 3, D)]))
    cfg = MoEConfig(num_experts=E, expert_hidden=3, **moe)
    stats = jax.jit(lambda x, k, w: moe_tokens(x, k, None, LocalExperts(w, "auto"), cfg)[1])(
        x, kernel, weights)
    return summarize(stats, aux_loss_weight=0.5, z_loss_weight=0.25)


def test_topk_softmax_hand_case():
    logits = jnp.log(P3) + SHIFT[:, None]
    r = routers.topk_softmax(logits, 2, renormalize=True)
    np.testing.assert_array_equal(r.expert, [[3, 2], [0, 1], [1, 2]])
    np.testing.assert_allclose(r.weight, [[4 / 7, 3 / 7], [2 / 3, 1 / 3], [0.75, 0.25]], **TOL)
    np.testing.assert_allclose(r.probs, P3, **TOL)
    raw = routers.topk_softmax(logits, 2, renormalize=False)
    np.testing.assert_allclose(raw.weight, [[0.4, 0.3], [0.5, 0.25], [0.6, 0.2]], **TOL)
    # f = [1, 2, 2, 1] / 6, P = [0.7, 1.05, 0.625, 0.625] / 3: aux = 4 * sum f P = 18.7 / 18
    loss, m = _stats_of(logits, top_k=2)
    np.testing.assert_allclose(m["load"], [1 / 6, 1 / 3, 1 / 3, 1 / 6], **TOL)
    np.testing.assert_allclose(m["aux_loss"], 18.7 / 18, **TOL)
    np.testing.assert_allclose(m["z_loss"], (1 + 4 + 0.25) / 3, **TOL)
    np.testing.assert_allclose(m["max_mean_load"], 4 / 3, **TOL)
    # loads [1, 2, 2, 1] / 6: entropy over log(4)
    entropy = -(2 * np.log(1 / 6) / 6 + 4 * np.log(1 / 3) / 6) / np.log(4)
    np.testing.assert_allclose(m["load_entropy"], entropy, **TOL)
    np.testing.assert_allclose(loss, 0.5 * 18.7 / 18 + 0.25 * 1.75, **TOL)
    assert float(m["dropped_fraction"]) == 0.0


def test_sigmoid_bias_hand_case():
    scores = np.array([[0.9, 0.8, 0.3, 0.6], [0.2, 0.7, 0.5, 0.1]])
    logits = jnp.log(scores / (1 - scores))
    plain = routers.sigmoid_bias(logits, jnp.zeros(4), 2)
    np.testing.assert_array_equal(plain.expert, [[0, 1], [1, 2]])
    np.testing.assert_allclose(plain.weight, [[9 / 17, 8 / 17], [7 / 12, 5 / 12]], **TOL)
    # the bias changes the choice but not the weights' source: unbiased scores
    biased = routers.sigmoid_bias(logits, jnp.array([0.0, 0.0, 0.55, 0.0]), 2)
    np.testing.assert_array_equal(biased.expert, [[0, 2], [2, 1]])
    np.testing.assert_allclose(biased.weight, [[0.75, 0.25], [5 / 12, 7 / 12]], **TOL)
    np.testing.assert_allclose(biased.probs, scores / scores.sum(1, keepdims=True), **TOL)
    with pytest.raises(ValueError, match="bias shape"):
        routers.sigmoid_bias(logits, jnp.zeros(3), 2)


def test_grouped_hand_case():
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.15, 0.1]])
    r = routers.grouped_topk(jnp.log(probs), 2, 2, renormalize=True)
    # one expert from {0, 1} and one from {2, 3}, although plain top-2 of row 1 is {0, 1}
    np.testing.assert_array_equal(r.expert, [[1, 3], [0, 2]])
    np.testing.assert_allclose(r.weight, [[1 / 3, 2 / 3], [0.5 / 0.65, 0.15 / 0.65]], **TOL)
    _, m = _stats_of(jnp.log(probs), top_k=2, router="grouped", num_groups=2)
    np.testing.assert_allclose(m["load"], [0.25, 0.25, 0.25, 0.25], **TOL)
    with pytest.raises(ValueError, match="num_groups"):
        routers.grouped_topk(jnp.log(probs), 1, 2, renormalize=True)


def test_expert_choice_hand_case():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    r = routers.expert_choice(jnp.log(probs), 2)
    np.testing.assert_array_equal(r.token, [[0, 1], [3, 2]])
    np.testing.assert_allclose(r.weight, [[0.9, 0.6], [0.8, 0.7]], **TOL)
    r3 = routers.expert_choice(jnp.log(probs), 3)
    np.testing.assert_array_equal(r3.token, [[0, 1, 2], [3, 2, 1]])
    assert routers.expert_capacity(4, 2, 1, 1.0) == 2
    assert routers.expert_capacity(4, 2, 1, 10.0) == 4  # never more than the tokens
    _, m = _stats_of(jnp.log(probs), top_k=1, router="expert_choice", dispatch="capacity",
                     capacity_factor=0.5)  # one token per expert: tokens 1 and 2 unchosen
    np.testing.assert_allclose(m["dropped_fraction"], 0.5, **TOL)
    np.testing.assert_allclose(m["max_mean_load"], 1.0, **TOL)
    np.testing.assert_allclose(m["load_entropy"], 1.0, **TOL)  # balanced
    with pytest.raises(ValueError, match="capacity"):
        routers.expert_choice(jnp.log(probs), 5)


# ------------------------------------------------------------ loop reference

def np_ffn(x, g, u, d):
    x, g, u, d = (np.asarray(a, np.float64) for a in (x, g, u, d))
    h = x @ g
    return (h / (1 + np.exp(-h)) * (x @ u)) @ d


def ffn(x, g, u, d):
    return (jax.nn.silu(x @ g) * (x @ u)) @ d


def choose(p, x, cfg: MoEConfig):
    """Reference selection, in numpy: expert ids per token, best first."""
    logits = np.asarray(x.reshape(-1, x.shape[-1]) @ p["router"], np.float64)
    if cfg.router == "sigmoid_bias":
        score = 1 / (1 + np.exp(-logits)) + np.asarray(p["bias"])
        return [list(np.argsort(-s, kind="stable")[:cfg.top_k]) for s in score]
    if cfg.router == "grouped":
        size, per = cfg.num_experts // cfg.num_groups, cfg.top_k // cfg.num_groups
        return [[g * size + j for g in range(cfg.num_groups)
                 for j in np.argsort(-s[g * size:(g + 1) * size], kind="stable")[:per]]
                for s in logits]
    return [list(np.argsort(-s, kind="stable")[:cfg.top_k]) for s in logits]


def _router_weights(logits, cfg: MoEConfig):
    """(scores whose chosen entries are the combine weights before any
    normalisation, probabilities for the aux loss)."""
    if cfg.router == "sigmoid_bias":
        s = 1 / (1 + np.exp(-logits)) if isinstance(logits, np.ndarray) else jax.nn.sigmoid(logits)
        return s, s / s.sum(-1, keepdims=True)
    e = np.exp(logits - logits.max(-1, keepdims=True)) if isinstance(logits, np.ndarray) \
        else jax.nn.softmax(logits, -1)
    e = e / e.sum(-1, keepdims=True)
    return e, e


def _normalizes(cfg: MoEConfig) -> bool:
    return cfg.renormalize or cfg.router == "sigmoid_bias"


def loop_moe(p, x, chosen, cfg: MoEConfig):
    """Per-token python loop over the chosen experts, in float64 numpy."""
    xs = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    src, _ = _router_weights(xs @ np.asarray(p["router"], np.float64), cfg)
    y = np.zeros_like(xs)
    for t, experts in enumerate(chosen):
        w = src[t, experts] / (src[t, experts].sum() if _normalizes(cfg) else 1.0)
        for wj, e in zip(w, experts):
            y[t] += wj * np_ffn(xs[t], p["gate"][e], p["up"][e], p["down"][e])
        if "shared" in p:
            s = p["shared"]
            y[t] += np_ffn(xs[t], s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
    return y.reshape(x.shape)


def masked_moe(p, x, chosen, cfg: MoEConfig):
    """Differentiable reference: every expert on every token, weighted by the
    (fixed) choice. Returns (y, weighted aux loss)."""
    xs = x.reshape(-1, x.shape[-1])
    logits = xs @ p["router"]
    src, probs = _router_weights(logits, cfg)
    mask = np.zeros((len(chosen), cfg.num_experts))
    for t, experts in enumerate(chosen):
        mask[t, experts] = 1.0
    w = src * mask
    w = w / w.sum(-1, keepdims=True) if _normalizes(cfg) else w
    y = sum(w[:, e:e + 1] * ffn(xs, p["gate"][e], p["up"][e], p["down"][e])
            for e in range(cfg.num_experts))
    if "shared" in p:
        s = p["shared"]
        y = y + ffn(xs, s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
    f = mask.sum(0) / mask.sum()
    aux = cfg.num_experts * jnp.sum(f * probs.mean(0))
    z = jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
    return y.reshape(x.shape), cfg.aux_loss_weight * aux + cfg.router_z_loss_weight * z


TOKEN_CHOICE = [
    dict(router="topk_softmax"),
    dict(router="topk_softmax", renormalize=False, top_k=1, gmm_implementation="ragged_dot"),
    dict(router="sigmoid_bias", num_shared_experts=1),
    dict(router="grouped", num_experts=6, num_groups=2, top_k=2),
    dict(router="topk_softmax", gmm_implementation="pallas"),  # interpreted kernel + custom VJP
]


def _layer(seed, **moe):
    cfg = model_cfg(**moe)
    layer = MoE(cfg, rngs=nnx.Rngs(seed))
    if layer.bias is not None:  # a non-trivial bias so that it matters for the choice
        layer.bias[...] = 0.3 * jax.random.normal(jax.random.key(seed + 100), layer.bias.shape)
    x = jax.random.normal(jax.random.key(seed + 1), (2, 7, cfg.d_model))
    return cfg, layer, x


@pytest.mark.parametrize("moe", TOKEN_CHOICE, ids=lambda m: "-".join(map(str, m.values())))
def test_dropless_matches_loop_forward_and_grads(moe):
    cfg, layer, x = _layer(3 + len(moe), **moe)
    graphdef, p = nnx.split(layer)[0], pure(layer)
    chosen = choose(p, x, cfg.moe)
    r = jax.random.normal(jax.random.key(7), x.shape)

    def loss(p, x):
        y, aux = nnx.merge(graphdef, p)(x)
        return jnp.sum(y * r) + aux["loss"], y

    def ref_loss(p, x):
        y, aux = masked_moe(p, x, chosen, cfg.moe)
        return jnp.sum(y * r) + aux, y

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (l, y), g = grad(loss)(p, x)
    (l_ref, y_ref), g_ref = grad(ref_loss)(p, x)
    np.testing.assert_allclose(y, loop_moe(p, x, chosen, cfg.moe), **TOL)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(l, l_ref, **TOL)
    g, g_ref = jax.tree.map(np.asarray, g), jax.tree.map(np.asarray, g_ref)
    if "bias" in g[0]:  # the bias only selects: no gradient
        assert not g[0].pop("bias").any()
        g_ref[0].pop("bias")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


# ------------------------------------------------------------ capacity dispatch

def test_capacity_with_room_equals_dropless():
    _, layer, x = _layer(11)
    y, aux = forward(layer, x)
    roomy = MoE(model_cfg(dispatch="capacity", capacity_factor=5.0), rngs=nnx.Rngs(11))
    y_cap, aux_cap = forward(roomy, x)
    np.testing.assert_allclose(y_cap, y, **TOL)
    assert float(aux_cap["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(aux_cap["loss"], aux["loss"], **TOL)


def _routed(expert, weight, num_experts):
    return routers.TokenChoice(jnp.asarray(expert, jnp.int32), jnp.asarray(weight, jnp.float32),
                               jnp.full((len(expert), num_experts), 1.0 / num_experts))


def _experts(seed, E, D=6, H=5):
    k = jax.random.split(jax.random.key(seed), 3)
    w = ExpertWeights(jax.random.normal(k[0], (E, D, H)), jax.random.normal(k[1], (E, D, H)),
                      jax.random.normal(k[2], (E, H, D)))
    return LocalExperts(w, "auto"), w


def test_capacity_drops_in_priority_order():
    x = jax.random.normal(jax.random.key(0), (6, 6))
    experts, w = _experts(1, 2)
    # k = 1: five tokens want expert 0, which has 2 slots -> tokens 2, 3, 4 are dropped
    route = _routed([[0], [0], [0], [0], [0], [1]], np.full((6, 1), 0.5), 2)
    capacity = jax.jit(lambda x, route: moe_dispatch.capacity(x, route, 2, 2, experts))
    y, kept = capacity(x, route)
    assert int(kept) == 3
    for t in range(6):
        e = int(route.expert[t, 0])
        expect = 0.0 if t in (2, 3, 4) else 0.5 * np_ffn(x[t], w.gate[e], w.up[e], w.down[e])
        np.testing.assert_allclose(y[t], expect, **TOL)
    # k = 2: every first choice is placed before any second choice
    x4 = x[:4]
    route = _routed([[0, 1], [0, 1], [1, 0], [1, 0]], [[0.7, 0.3]] * 4, 2)
    y, kept = capacity(x4, route)
    assert int(kept) == 4
    for t in range(4):
        e = int(route.expert[t, 0])
        np.testing.assert_allclose(y[t], 0.7 * np_ffn(x4[t], w.gate[e], w.up[e], w.down[e]), **TOL)
    # through the layer: the dropped fraction of that routing is 4 of 8
    logits = jnp.log(jnp.array([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]]))
    _, m = _stats_of(logits, top_k=2, dispatch="capacity", capacity_factor=0.5)
    np.testing.assert_allclose(m["dropped_fraction"], 0.5, **TOL)


def test_expert_choice_dispatch_matches_loop():
    x = jax.random.normal(jax.random.key(2), (5, 6))
    experts, w = _experts(3, 3)
    route = routers.expert_choice(jax.random.normal(jax.random.key(4), (5, 3)), 2)
    y, unchosen = jax.jit(lambda x, r: moe_dispatch.chosen_by_experts(x, r, experts))(x, route)
    expect = np.zeros((5, 6))
    for e in range(3):
        for t, wt in zip(np.asarray(route.token[e]), np.asarray(route.weight[e])):
            expect[t] += wt * np_ffn(x[t], w.gate[e], w.up[e], w.down[e])
    np.testing.assert_allclose(y, expect, **TOL)
    assert int(unchosen) == int((np.abs(expect).sum(1) == 0).sum())


# ------------------------------------------------------------ imbalance

def test_imbalanced_and_empty_experts():
    """All tokens pick experts {0, 1}: three experts get no rows at all."""
    cfg, layer, x = _layer(5)
    x = x.at[..., 0].set(4.0)
    layer.router[...] = layer.router[...].at[0].set(jnp.array([3.0, 2.5, -3.0, -3.0, -3.0]))
    p, graphdef = pure(layer), nnx.split(layer)[0]
    chosen = choose(p, x, cfg.moe)
    assert {tuple(sorted(c)) for c in chosen} == {(0, 1)}
    y, aux = forward(layer, x)
    np.testing.assert_allclose(y, loop_moe(p, x, chosen, cfg.moe), **TOL)
    np.testing.assert_allclose(aux["load"], [0.5, 0.5, 0, 0, 0], **TOL)
    np.testing.assert_allclose(aux["max_mean_load"], 2.5, **TOL)
    np.testing.assert_allclose(aux["load_entropy"], np.log(2) / np.log(5), **TOL)  # empty experts
    g = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)))(p)
    for name in ("gate", "up", "down"):
        assert not np.asarray(g[name][2:]).any(), name  # empty experts get no gradient
        assert np.asarray(g[name][:2]).any(), name


def test_aux_loss_free_bias_moves_load_toward_balance():
    cfg = model_cfg(router="sigmoid_bias", bias_update_rate=0.05, aux_loss_weight=0.0)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.router[...] = layer.router[...].at[0].add(jnp.array([2.0, 1.5, 0.0, -1.0, -1.0]))
    x = jax.random.normal(jax.random.key(1), (4, 16, cfg.d_model)).at[..., 0].set(1.5)
    assert not nnx.state(layer, nnx.Param).get("bias")  # state, not an optimizer parameter
    assert isinstance(layer.bias, RouterBias)
    call = nnx.jit(lambda layer, x: layer(x)[1]["max_mean_load"])
    first = call(layer, x)
    np.testing.assert_array_equal(layer.bias[...], 0.0)  # eval mode: no update
    layer.train()
    ratios = [float(call(layer, x)) for _ in range(40)]
    assert ratios[0] == pytest.approx(float(first)) and ratios[0] > 1.8
    assert max(ratios[-10:]) < 1.5, ratios  # the sign update then oscillates around balance
    layer.eval()
    bias = np.asarray(layer.bias[...])
    call(layer, x)
    np.testing.assert_array_equal(layer.bias[...], bias)


def test_centered_router_input_balances_a_shared_direction():
    """Tokens that share one dominant vector all pick the same experts unless
    the router sees them with the batch mean removed; outside training the
    running mean (bias-corrected: the batch mean after one step) is removed."""
    E, k = 16, 2
    cfg = model_cfg(d_model=32, num_experts=E, top_k=k, center_router_input=True)
    plain = MoE(model_cfg(d_model=32, num_experts=E, top_k=k), rngs=nnx.Rngs(0))
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    shared = 4.0 * jax.random.normal(jax.random.key(3), (32,))
    x = shared + jax.random.normal(jax.random.key(4), (4, 64, 32))
    assert float(forward(plain, x)[1]["max_mean_load"]) > 6.0  # nearly all on k of E / k = 8
    assert not nnx.state(layer, nnx.Param).get("center")  # state, not an optimizer parameter
    call = nnx.jit(lambda layer, x: layer(x))
    layer.train()
    y_train, aux = call(layer, x)
    assert float(aux["max_mean_load"]) < 2.0
    np.testing.assert_allclose(layer.center[...][:-1], 0.01 * jnp.mean(x, axis=(0, 1)), rtol=1e-5)
    layer.eval()
    state = np.asarray(layer.center[...])
    y_eval, _ = call(layer, x)
    np.testing.assert_array_equal(layer.center[...], state)  # eval mode: no update
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-4, atol=1e-4)  # mean / (1 - 0.99) rounds


# ------------------------------------------------------------ config, model

def test_config_rejects_impossible_moe(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  moe:\n    num_experts: 4\n    router: expert_choice\n")
    with pytest.raises(ConfigError, match="dispatch: capacity"):
        load_config(f)
    with pytest.raises(ConfigError, match="num_groups"):
        load_config(f, ["model.moe.router=topk_softmax", "model.moe.num_groups=2"])
    assert load_config(f, ["model.moe.dispatch=capacity"]).model.moe.router == "expert_choice"


def test_moe_params_carry_logical_axes():
    layer = MoE(model_cfg(num_shared_experts=2), rngs=nnx.Rngs(0))
    axes = {"/".join(map(str, path)): v.get_metadata()["logical_axes"]
            for path, v in nnx.iter_graph(layer) if isinstance(v, nnx.Param)}
    assert axes["router"] == ("embed", None)
    assert axes["gate"] == axes["up"] == ("exp", "embed", "mlp")
    assert axes["down"] == ("exp", "mlp", "embed")
    assert layer.shared.gate.kernel.shape == (12, 20)


@pytest.mark.parametrize("dtype,moe", [
    ("bfloat16", dict(router="topk_softmax", every=2, num_shared_experts=1)),
    ("float32", dict(router="sigmoid_bias", dispatch="capacity"))],
    ids=["topk-dropless-bf16", "sigmoid-capacity-f32"])
def test_tiny_moe_transformer_forward_and_grad(dtype, moe):
    cfg = ModelConfig(vocab_size=37, d_model=16, num_layers=2, num_heads=2, mlp_hidden=24,
                      max_seq_len=16, compute_dtype=dtype,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, **moe))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.train()
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 37)

    def loss_fn(model):
        logits, aux = model(tokens)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                           tokens[:, 1:, None], -1))
        return ce + aux["moe_loss"], aux

    (loss, aux), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    assert np.isfinite(float(loss)) and float(aux["moe_loss"]) > 0
    assert sorted(aux["moe"]) == [i for i in range(2) if cfg.is_moe_layer(i)]
    assert set(aux["moe"][0]) == {"load", "max_mean_load", "load_entropy", "dropped_fraction",
                                 "aux_loss", "z_loss"}
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads["blocks"][0]["mlp"]["gate"][...])).sum() > 0
    if moe["router"] == "sigmoid_bias":  # one training forward moved the bias
        assert np.abs(np.asarray(model.blocks[0].mlp.bias[...])).sum() > 0


def test_train_step_carries_router_bias_update():
    """jaxkit.train's step carries the bias through gradient accumulation."""
    cfg = ModelConfig(vocab_size=37, d_model=16, num_layers=1, num_heads=2, mlp_hidden=24,
                      max_seq_len=16, compute_dtype="float32",
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, router="sigmoid_bias",
                                    bias_update_rate=0.1))
    graphdef, eval_graphdef, params, model_state = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = optax.sgd(1e-3)
    state = dict(params=params, opt_state=opt.init(params), model_state=model_state,
                 step=jnp.zeros((), jnp.int32))
    tok = jax.random.randint(jax.random.key(0), (4, 9), 0, 37)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
    bias = lambda s: np.asarray(nnx.to_pure_dict(s)["blocks"][0]["mlp"]["bias"])
    metrics = jax.jit(make_eval_step(eval_graphdef))(state["params"], state["model_state"], batch)
    assert float(metrics["moe"][0]["max_mean_load"]) >= 1.0
    step = jax.jit(make_train_step(graphdef, opt, lambda s: 1e-3, grad_accum=2, z_loss=0.0))
    new, _ = step(state, batch)
    moves = np.abs(bias(new["model_state"])) / 0.1  # two micro-batches, each moving it +-0.1
    np.testing.assert_allclose(moves, np.round(moves), atol=1e-4)
    assert moves.max() > 0 and moves.max() <= 2 + 1e-4 and not bias(state["model_state"]).any()


# ------------------------------------------------------------ expert parallelism

def test_expert_parallel_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("ok ") == len(EP_CASES), proc.stdout


P_ = jax.sharding.PartitionSpec
EP_QAT = dict(quant=QuantConfig(mode="qat", weight_format="int4", activation_format="int8",
                                hadamard=True, targets=("experts",)))
EP_CASES = [  # (mesh axes, explicit sharding, moe config)
    ({"data": 2, "expert": 4}, True, dict(router="topk_softmax", num_shared_experts=1)),
    ({"data": 2, "expert": 4}, True, dict(router="topk_softmax", **EP_QAT)),
    ({"data": 2, "expert": 4}, False, dict(router="sigmoid_bias")),
    ({"data": 2, "expert": 4}, True, dict(router="sigmoid_bias", center_router_input=True)),
    ({"fsdp": 2, "expert": 2, "sequence": 2}, True, dict(router="grouped", num_groups=2)),
    ({"data": 2, "expert": 4}, True, dict(router="topk_softmax", dispatch="capacity",
                                          capacity_factor=8.0)),
    ({"data": 2, "expert": 4}, False, dict(router="expert_choice", dispatch="capacity")),
]


def _ep_case(axes, explicit, moe):
    """Layer on a mesh vs on one device: forward, aux, gradients and the
    updated bias. Expert choice picks tokens per shard, so its reference is
    the single-device layer applied to each token shard."""
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(kind,) * len(axes))
    cfg = model_cfg(d_model=8, num_experts=4, expert_hidden=6, **moe)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.train()
    graphdef, p = nnx.split(layer)[0], pure(layer)
    x = jax.random.normal(jax.random.key(1), (8, 4, 8))
    r = jax.random.normal(jax.random.key(2), x.shape)

    def step(p, x):
        def loss(p, x):
            model = nnx.merge(graphdef, p)
            y, aux = model(x)
            return jnp.sum(y * r) + aux["loss"], (y, aux, nnx.to_pure_dict(nnx.state(model)))
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)

    (_, (y1, aux1, state1)), g1 = jax.jit(step)(p, x)
    with activate(mesh, resolve_rules()):
        batch = tuple(a for a in ("data", "fsdp") if a in axes) or None
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P_(batch)))
        assert "all_to_all" in str(jax.make_jaxpr(step)(p, xs))  # really expert-parallel
        (_, (y2, aux2, state2)), g2 = jax.jit(step)(p, xs)
    if cfg.moe.router == "expert_choice":
        y1 = jnp.concatenate([jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(p, x[i:i + 1])
                              for i in range(8)])
        np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
        return
    for a, b in [(y1, y2), (aux1, aux2), (state1, state2), (g1, g2)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), a, b)


if __name__ == "__main__":  # the expert-parallel check, run with 8 fake CPU devices
    assert jax.device_count() == 8, jax.devices()
    with jax.default_matmul_precision("highest"):
        for case in EP_CASES:
            _ep_case(*case)
            print("ok", case, flush=True)
