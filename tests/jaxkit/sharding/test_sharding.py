"""Meshes, sharding rules, sharded training equal to single-device training,
remat and scanned layers equal to the plain model. The multi-device runs are
made once per session by the 8-device worker (multidevice.py, through the
``eight_devices`` fixture); the tests here read its results."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ConfigError, MeshConfig, ModelConfig
from jaxkit.models import Transformer
from jaxkit.sharding import logical_to_spec, mesh_shape, resolve_rules
from multidevice import MESHES, STEPS, assert_trees_close, load_tree, losses


def test_mesh_shape_fills_and_rejects():
    assert mesh_shape(MeshConfig(data=-1, tensor=2), 8) == dict(
        data=4, fsdp=1, expert=1, sequence=1, tensor=2)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match=r"tensor=3.*3 devices.*8 devices"):
        mesh_shape(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match=r"uses 4 devices but 8 are available"):
        mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match="at most one"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


def test_rules_defaults_overrides_and_errors():
    rules = resolve_rules()
    assert logical_to_spec(("embed", "heads"), rules) == jax.P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), rules) == jax.P("tensor", "fsdp")
    assert logical_to_spec(("exp", "embed", "mlp"), rules) == jax.P("expert", "fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "act_embed"), rules) == jax.P(
        ("data", "fsdp", "expert"), "sequence", None)
    assert logical_to_spec(("norm",), rules) == jax.P(None)
    custom = resolve_rules({"embed": None, "mlp": ["tensor", "sequence"], "my_axis": "expert"})
    assert logical_to_spec(("embed", "mlp"), custom) == jax.P(None, ("tensor", "sequence"))
    assert logical_to_spec(("my_axis",), custom) == jax.P("expert")
    with pytest.raises(ConfigError, match=r"mesh.rules.embed: unknown mesh axis 'fdsp'"):
        resolve_rules({"embed": "fdsp"})
    with pytest.raises(ConfigError, match=r"'fsdp'.*only one dimension"):
        logical_to_spec(("embed", "mlp"), resolve_rules({"mlp": "fsdp"}), what="w")
    with pytest.raises(ConfigError, match=r"logical axis 'rows' has no sharding rule"):
        logical_to_spec(("rows",), rules)


SMALL = ModelConfig(vocab_size=29, d_model=24, num_layers=3, num_heads=3, num_kv_heads=1,
                    mlp_hidden=40, max_seq_len=16, compute_dtype="float32")
# Compile options for in-process jits (tests here compare like with like).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _primitives(jaxpr, found=None) -> list:
    """(primitive name, params) of every equation, nested jaxprs included."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, eqn.params))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives(inner, found)
    return found


def _loss_and_grads(cfg: ModelConfig):
    """(loss, grads as a pure dict, primitives of the loss) on fixed random tokens."""
    tokens = jax.random.randint(jax.random.key(7), (3, 11), 0, cfg.vocab_size)
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param, ...)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 1])

    fn = jax.jit(jax.value_and_grad(loss)).lower(params).compile(FAST)
    value, grads = fn(params)
    return value, nnx.to_pure_dict(grads), _primitives(jax.make_jaxpr(loss)(params).jaxpr)


@pytest.fixture(scope="module")
def plain_model_grads():
    return _loss_and_grads(SMALL)


def _unstack(grads: dict, num_layers: int) -> dict:
    """Scanned-model gradients (one Period of one block, stacked) in the plain layout."""
    stacked = grads["blocks"]["layers"][0]
    return {**grads, "blocks": {i: jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers)}}


@pytest.mark.parametrize("remat,scan,policy", [
    ("full", False, None), ("save_dots", True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)])
def test_remat_and_scan_match_plain_model(plain_model_grads, remat, scan, policy):
    ref_loss, ref_grads, ref_prims = plain_model_grads
    loss, grads, prims = _loss_and_grads(dataclasses.replace(SMALL, remat=remat, scan_layers=scan))
    is_remat = lambda params: "policy" in params and "prevent_cse" in params  # jax.checkpoint
    remats = [params for _, params in prims if is_remat(params)]
    assert remats and all(p["policy"] is policy for p in remats)
    assert len(remats) == (1 if scan else SMALL.num_layers)
    assert not any(is_remat(params) for _, params in ref_prims)
    assert any(name == "scan" for name, _ in prims) == scan
    if scan:
        grads = _unstack(grads, SMALL.num_layers)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), (_, r) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                 jax.tree_util.tree_flatten_with_path(ref_grads)[0], strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scanned_params_carry_layers_axis_and_irregular_layers_raise():
    cfg = ModelConfig(vocab_size=29, d_model=24, num_layers=4, num_heads=3, max_seq_len=16,
                      mlp_hidden=40, scan_layers=True)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    kernel = model.blocks.layers[0].attn.q.kernel
    assert kernel.shape == (4, 24, 24)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    moe = dict(num_experts=4, top_k=1, expert_hidden=8, first_layer=1, every=2)
    irregular = dataclasses.replace(cfg, num_layers=3,
                                    moe=dataclasses.replace(cfg.moe, **moe))  # D M D
    with pytest.raises(ConfigError, match="scan_layers"):
        nnx.eval_shape(lambda: Transformer(irregular, rngs=nnx.Rngs(0)))


def test_meshes_match_single_device(eight_devices):
    ref_losses = losses(eight_devices / "ref")
    assert len(ref_losses) == STEPS
    ref_params = load_tree(eight_devices / "ref" / "params.npz")
    for name in MESHES:
        np.testing.assert_allclose(losses(eight_devices / name), ref_losses, rtol=2e-6, err_msg=name)
        assert_trees_close(load_tree(eight_devices / name / "params.npz"), ref_params)


def test_params_and_optimizer_state_sharded_by_rules(eight_devices):
    layout = json.loads((eight_devices / "layouts.json").read_text())
    fsdp, mixed = layout["fsdp8"], layout["data2_fsdp2_tensor2"]
    # FSDP: weights split along embed over 8 devices; moments follow their weights.
    assert fsdp["params"]["blocks.0.attn.q.kernel"] == ["P('fsdp', 'tensor')", [4, 32]]
    assert fsdp["params"]["blocks.0.mlp.down.kernel"] == ["P('tensor', 'fsdp')", [48, 4]]
    assert fsdp["params"]["embed"] == ["P('tensor', 'fsdp')", [64, 4]]
    assert fsdp["params"]["final_norm.scale"] == ["P(None,)", [32]]
    assert fsdp["mu"]["blocks.0.attn.q.kernel"] == fsdp["params"]["blocks.0.attn.q.kernel"]
    assert fsdp["mu"]["embed"] == fsdp["params"]["embed"]
    # FSDP x tensor parallel: embed over fsdp=2, heads/mlp/vocab over tensor=2.
    assert mixed["params"]["blocks.1.attn.k.kernel"] == ["P('fsdp', 'tensor')", [16, 8]]
    assert mixed["params"]["blocks.1.mlp.gate.kernel"] == ["P('fsdp', 'tensor')", [16, 24]]
    assert mixed["params"]["embed"] == ["P('tensor', 'fsdp')", [32, 16]]
    assert mixed["nu"]["blocks.1.mlp.gate.kernel"] == mixed["params"]["blocks.1.mlp.gate.kernel"]
    # The batch is split over data x fsdp (x expert) and replicated over tensor.
    assert layout["data2_fsdp2_tensor2"]["batch"] == ["P(('data', 'fsdp', 'expert'),)", [4, 32]]


def test_bad_sizes_fail_before_compiling(eight_devices):
    errors = json.loads((eight_devices / "errors.json").read_text())
    assert "parameter embed: dim 0 (logical axis 'vocab') of size 66 is not divisible by mesh " \
           "axes tensor=4" in errors["vocab"]
    assert "data.batch_size (16) / train.grad_accum (4) = 4" in errors["batch"]
    assert "8 batch shards" in errors["batch"]


def test_per_shard_splits_batch_and_heads_only_where_they_divide(eight_devices):
    checks = json.loads((eight_devices / "per_shard.json").read_text())
    # 4 query and 4 kv heads over tensor=4: each device sees 2 sequences x 1 head.
    assert checks["4"]["seen"] == [[2, 6, 1, 8], [2, 6, 1, 8], True]
    assert checks["4"]["out_shard"] == [2, 6, 1, 8]
    # 2 kv heads do not divide tensor=4: heads stay whole (for q too, keeping groups aligned).
    assert checks["2"]["seen"] == [[2, 6, 4, 8], [2, 6, 2, 8], True]
    assert checks["2"]["out_shard"] == [2, 6, 4, 8]
    assert checks["4"]["error"] < 1e-5 and checks["2"]["error"] < 1e-5
