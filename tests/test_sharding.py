"""Meshes, sharding rules, sharded training equal to single-device training,
remat and scanned layers equal to the plain model.

Multi-device runs happen in a subprocess with 8 CPU devices
(--xla_force_host_platform_device_count must be set before jax starts);
the worker below runs every multi-device scenario once per session and the
tests here and in test_checkpoint.py / test_multihost.py read its results.
"""
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ConfigError, MeshConfig, ModelConfig
from jaxkit.models import Transformer
from jaxkit.sharding import logical_to_spec, mesh_shape, resolve_rules

# A tiny model on the MQAR task (synthetic, no files), float32 compute.
TINY = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_hidden=48", "model.max_seq_len=32",
        "model.compute_dtype=float32", "data.kind=mqar", "data.seq_len=32", "data.batch_size=16",
        "data.mqar_vocab_size=64", "data.mqar_num_kv_pairs=4", "train.steps=6",
        "train.log_every=1", "train.eval_every=0", "train.progress=false",
        "optimizer.warmup_steps=2"]
STEPS, STOP_AT = 6, 3
MESHES = {"data8": ["mesh.data=8"],
          "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
          "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}
# Faster XLA CPU compiles (the tests compare runs made with the same flags).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def worker_env(devices: int, cache_dir) -> dict:
    """Environment for a jax subprocess with `devices` CPU devices, sharing a
    persistent compilation cache so identical programs compile once."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_worker(name: str, out: Path, devices: int, cache_dir, script: str = __file__,
               timeout: int = 300):
    """Runs worker_<name>(out) of `script` in a subprocess with `devices` CPU devices."""
    proc = subprocess.run([sys.executable, script, name, str(out)],
                          env=worker_env(devices, cache_dir), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"worker {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def load_tree(path: Path) -> dict:
    with np.load(path) as f:
        return dict(f)


def assert_trees_close(a: dict, b: dict, rtol=2e-5, atol=2e-6):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def _session_dir(tmp_path_factory) -> Path:
    """A directory shared by the whole test session (all xdist workers too)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    path = _session_dir(tmp_path_factory) / "jax_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory, compile_cache) -> Path:
    """Runs the 8-device worker once per session (the test modules that use it
    import this fixture, and xdist workers wait for each other on a lock);
    returns its output directory."""
    out = _session_dir(tmp_path_factory) / "eight_devices"
    out.mkdir(exist_ok=True)
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            run_worker("eight_devices", out, 8, compile_cache)
            (out / "done").touch()
    return out


# ------------------------------------------------------------------ tests

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
    moe = dict(num_experts=4, top_k=1, expert_hidden=8, first_layer=1, every=1)
    irregular = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))  # D M M M
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


# ------------------------------------------------------------------ worker

class SignalAt:
    """Data source that sends this process SIGTERM (a preemption notice) when
    the batch for `step` is drawn."""

    def __init__(self, source, step: int):
        self.source, self.step = source, step

    def batch(self, step, **kw):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source.batch(step, **kw)


def save_tree(tree, path: Path):
    """Saves a tree of arrays as .npz keyed by dotted paths ('blocks.0.attn.q.kernel')."""
    from jaxkit.sharding.state import path_str
    np.savez(path, **{path_str(p): np.asarray(v)
                      for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]})


def _save_params(trainer, path: Path):
    save_tree(trainer.state["params"], path)


def _layout(tree) -> dict:
    from jaxkit.sharding.state import path_str
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_str(path).removesuffix(".value")
        out[name] = [repr(x.sharding.spec), list(x.sharding.shard_shape(x.shape))]
    return out


def _train(overrides, run_dir, devices, *, sources=None, resume=False):
    from jaxkit.config import load_config
    from jaxkit.train.trainer import Trainer
    trainer = Trainer(load_config(None, TINY + overrides), run_dir, devices=devices, sources=sources)
    return trainer, trainer.fit(resume=resume)


def worker_eight_devices(out: Path):
    from jaxkit.build import build_data
    from jaxkit.config import load_config
    assert jax.device_count() == 8
    one = jax.devices()[:1]
    # Single-device reference, straight through.
    trainer, _ = _train(["checkpoint.enabled=false"], out / "ref", one)
    _save_params(trainer, out / "ref" / "params.npz")
    # Single device again, preempted (SIGTERM) after step 3, then resumed.
    train_src, eval_src = build_data(load_config(None, TINY))
    _, result = _train([], out / "resumed", one, sources=(SignalAt(train_src, STOP_AT - 1), eval_src))
    assert result == {**result, "step": STOP_AT, "stopped_early": True}, result
    trainer, result = _train([], out / "resumed", one, resume=True)
    assert result["step"] == STEPS and not result["stopped_early"], result
    _save_params(trainer, out / "resumed" / "params.npz")
    # Sharded runs; fsdp8 keeps a checkpoint at step 3 for the cross-mesh restore.
    layouts = {}
    for name, mesh in MESHES.items():
        ckpt = ["checkpoint.every=3"] if name == "fsdp8" else ["checkpoint.enabled=false"]
        trainer, _ = _train(mesh + ckpt, out / name, None)
        _save_params(trainer, out / name / "params.npz")
        opt = trainer.state["opt_state"][1][0]  # clip_by_global_norm, then adamw's moments
        batch = trainer._batch(trainer.train_data, 0)
        layouts[name] = dict(params=_layout(trainer.state["params"]), mu=_layout(opt.mu),
                             nu=_layout(opt.nu), batch=_layout({"": batch["inputs"]})[""])
    (out / "layouts.json").write_text(json.dumps(layouts))
    errors = {}
    for key, overrides in [("vocab", ["model.vocab_size=66", "mesh.data=2", "mesh.tensor=4"]),
                           ("batch", ["mesh.data=8", "train.grad_accum=4"])]:
        try:
            _train(overrides, out / f"bad_{key}", None)
        except ConfigError as e:
            errors[key] = str(e)
    (out / "errors.json").write_text(json.dumps(errors))
    (out / "per_shard.json").write_text(json.dumps(_per_shard_checks()))


def _per_shard_checks() -> dict:
    """Attention run per shard on a data=2 x tensor=4 mesh, with kv heads that
    divide the tensor axis and with kv heads that do not."""
    from jaxkit.layers.attention import HEADS
    from jaxkit.sharding import activate, make_mesh, per_shard
    from pallas_kernels.attention import flash_attention
    mesh, results = make_mesh(MeshConfig(data=2, tensor=4)), {}
    for kv_heads in (4, 2):
        seen = []

        def attention(q, k, v, seg):
            seen.append([list(q.shape), list(k.shape), seg is None])
            return flash_attention(q, k, v, causal=True, implementation="xla")

        keys = jax.random.split(jax.random.key(kv_heads), 3)
        q = jax.random.normal(keys[0], (4, 6, 4, 8))
        k, v = (jax.random.normal(key, (4, 6, kv_heads, 8)) for key in keys[1:])
        with activate(mesh, resolve_rules()):
            out = jax.jit(per_shard(attention, in_axes=(HEADS, HEADS, HEADS, ("batch", None)),
                                    out_axes=HEADS))(q, k, v, None)
        error = float(jnp.abs(out - flash_attention(q, k, v, causal=True, implementation="xla")).max())
        results[kv_heads] = dict(seen=seen[-1], error=error,
                                 out_shard=list(out.sharding.shard_shape(out.shape)))
    return results


if __name__ == "__main__":
    globals()[f"worker_{sys.argv[1]}"](Path(sys.argv[2]))
