"""The linear-attention mixer on a mesh that splits the sequence (data=2 x
sequence=4 of 8 CPU devices) runs sequence-parallel and equals the
unsharded layer, outputs and gradients; a length the mesh cannot split is
refused in one line."""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multidevice import run_worker

TOL = 1e-5  # ||sharded - unsharded|| / ||unsharded||, float32


def test_sequence_parallel_mixer_matches_unsharded(tmp_path, compile_cache):
    run_worker("sharded_mixer", tmp_path, 8, compile_cache, script=__file__)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["x_shard"] == [2, 8, 32]  # batch over data, length over sequence
    assert report["errors"] and max(report["errors"].values()) < TOL, report["errors"]
    assert report["refusal"] == ("sequence length 30 is not divisible by the 4 devices of mesh "
                                 "axes ('sequence',) that split it")


def _relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def worker_sharded_mixer(out: Path):
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxkit.config import LinearAttentionConfig, MeshConfig
    from jaxkit.layers.linear_attention import LinearAttention
    from jaxkit.sharding import activate, make_mesh, resolve_rules
    jax.config.update("jax_default_matmul_precision", "highest")
    layer = LinearAttention(32, 2, 16, cfg=LinearAttentionConfig(chunk_size=16, implementation="xla"),
                            rngs=nnx.Rngs(0), param_dtype=jnp.float32, compute_dtype=jnp.float32)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32))
    cotangent = jax.random.normal(jax.random.key(2), x.shape)

    def out_and_grads(params, x):
        y, pull = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return y, pull(cotangent)

    expected = jax.jit(out_and_grads)(params, x)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", "sequence")))
    with activate(mesh, resolve_rules()):
        got = jax.jit(out_and_grads)(params, x_sharded)
        try:
            jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x[:, :30])
            refusal = None
        except ValueError as e:
            refusal = str(e)
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
    errors = {jax.tree_util.keystr(path): _relative_error(a, b)
              for (path, a), (_, b) in zip(flat(got), flat(expected))}
    report = dict(errors=errors, refusal=refusal,
                  x_shard=list(x_sharded.sharding.shard_shape(x.shape)))
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    globals()[f"worker_{sys.argv[1]}"](Path(sys.argv[2]))
