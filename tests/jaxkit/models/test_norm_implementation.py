"""model.norm_implementation=pallas: the norm kernels (interpreted on CPU)
give a model the loss and parameter gradients of the reference norms,
unrolled and scanned with remat, the same generation logits through the KV
cache, and on a mesh (8 CPU devices, the kernel per shard of rows) the
single-device results, the model's dimension split over devices or not."""
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ModelConfig
from jaxkit.generate.cache import empty_caches
from jaxkit.models import Transformer
from multidevice import run_worker

# float32 compute; D = 32 and 2 x 11 tokens: one partial tile of rows.
TINY = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_hidden=48, max_seq_len=32, compute_dtype="float32")
TOL = 1e-5  # relative error of the loss and of each gradient (observed ~1e-7)


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def loss_and_grads(cfg: ModelConfig, tokens):
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param, ...)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 1])

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, nnx.to_pure_dict(grads)


def gradient_errors(got, want) -> dict:
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
    return {jax.tree_util.keystr(path): relative_error(g, w)
            for (path, g), (_, w) in zip(flat(got), flat(want), strict=True)}


@pytest.mark.parametrize("variant", [{}, {"scan_layers": True, "remat": "full"}],
                         ids=["unrolled", "scanned_remat"])
def test_pallas_norms_match_the_reference(variant):
    tokens = jax.random.randint(jax.random.key(7), (2, 11), 0, TINY.vocab_size)
    base = dataclasses.replace(TINY, **variant)
    want_loss, want = loss_and_grads(dataclasses.replace(base, norm_implementation="xla"), tokens)
    loss, grads = loss_and_grads(dataclasses.replace(base, norm_implementation="pallas"), tokens)
    assert relative_error(loss, want_loss) < TOL
    errors = gradient_errors(grads, want)
    assert any("norm" in path for path in errors) and max(errors.values()) < TOL, errors


def test_generation_with_pallas_norms_matches_the_reference():
    """Prefill and decode steps (Block.cached, the final norm of [B, D] last tokens)."""
    tokens = jax.random.randint(jax.random.key(8), (2, 9), 0, TINY.vocab_size)
    lengths = jnp.array([6, 4], jnp.int32)
    logits = {}
    for implementation in ("xla", "pallas"):
        cfg = dataclasses.replace(TINY, norm_implementation=implementation)
        model = Transformer(cfg, rngs=nnx.Rngs(3))
        caches = empty_caches(cfg.num_layers, (2, 12), cfg.kv_heads, cfg.dim_per_head,
                              "float32")
        steps, (last, caches) = [], model.prefill(tokens[:, :6], lengths, caches)
        steps.append(last)
        for t in range(2):
            step, caches = model.decode(tokens[:, 6 + t:7 + t], lengths + t + 1, caches,
                                        implementation="xla")
            steps.append(step[:, 0])
        logits[implementation] = steps
    for got, want in zip(logits["pallas"], logits["xla"], strict=True):
        assert relative_error(got, want) < TOL


def test_pallas_norms_on_a_mesh_match_one_device(tmp_path, compile_cache):
    run_worker("sharded_norms", tmp_path, 8, compile_cache, script=__file__)
    assert json.loads((tmp_path / "per_shard.json").read_text())  # the kernel ran in shard_map
    report = json.loads((tmp_path / "report.json").read_text())
    for name, errors in report.items():
        assert errors and max(errors.values()) < TOL, (name, errors)


def test_pallas_norm_training_follows_the_reference_over_100_steps():
    """A bf16 model trained 100 steps with the norm kernels (the residual add
    fused into the next norm) follows the reference norms' loss curve within
    bf16 noise."""
    from training_curve import loss_curve, repeats_batch, tiny_config

    batch = repeats_batch(67, 24)
    reference, fused = (loss_curve(tiny_config(f"model.norm_implementation={i}"), batch)
                        for i in ("xla", "pallas"))
    assert reference[-1] < 0.5 * reference[0]  # it learns, so the comparison means something
    np.testing.assert_allclose(fused, reference, rtol=0.03, atol=0.02)


def worker_sharded_norms(out: Path):
    """Loss and gradients of the pallas-norm model on data=2 x fsdp=2 x
    tensor=2 against the xla-norm model on one device; and an RMSNorm
    layer alone with the model dimension split over tensor (act_embed),
    which the kernel must see whole."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxkit.config import MeshConfig
    from jaxkit.layers import RMSNorm
    from jaxkit.sharding import activate, make_mesh, resolve_rules
    jax.config.update("jax_default_matmul_precision", "highest")
    tokens = jax.random.randint(jax.random.key(7), (4, 11), 0, TINY.vocab_size)
    want_loss, want = loss_and_grads(dataclasses.replace(TINY, norm_implementation="xla"), tokens)
    report = {}
    with activate(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), resolve_rules()):
        loss, grads = loss_and_grads(dataclasses.replace(TINY, norm_implementation="pallas"),
                                     tokens)
    report["model"] = {"loss": relative_error(loss, want_loss), **gradient_errors(grads, want)}

    x = jax.random.normal(jax.random.key(1), (4, 6, 32))
    delta, dy, dsum = (jax.random.normal(jax.random.key(i), x.shape) for i in (2, 3, 4))

    def out_and_grads(implementation, x, delta):
        norm = RMSNorm(32, implementation=implementation)
        norm.scale[...] = 1.0 + 0.1 * jnp.arange(32.0)
        graphdef, params = nnx.split(norm)

        def run(params, x, delta):
            return nnx.merge(graphdef, params).add(x, delta)
        outs, pull = jax.vjp(run, params, x, delta)
        return outs, pull((dsum, dy))

    expected = jax.jit(out_and_grads, static_argnums=0)("xla", x, delta)
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    split = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))
    with activate(mesh, resolve_rules({"act_embed": "tensor"})):
        args = ("pallas", jax.device_put(x, split), jax.device_put(delta, split))
        got = jax.jit(out_and_grads, static_argnums=0)(*args)
        jaxpr = str(jax.make_jaxpr(out_and_grads, static_argnums=0)(*args))
    report["layer_embed_split"] = gradient_errors(got, expected)
    (out / "per_shard.json").write_text(json.dumps("shard_map" in jaxpr))
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    globals()[f"worker_{sys.argv[1]}"](Path(sys.argv[2]))
