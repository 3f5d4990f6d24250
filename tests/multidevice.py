"""Shared machinery of the multi-device tests (test_sharding.py,
test_checkpoint.py, test_multihost.py): the tiny training config, CPU-device
subprocess workers, and the 8-device worker that runs every sharded scenario
once per session (the ``eight_devices`` fixture in conftest.py) for those
modules to check.

Multi-device runs happen in a subprocess because
--xla_force_host_platform_device_count must be set before jax starts; this
file is also that subprocess's script (``python multidevice.py NAME OUT``).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.config import ConfigError, MeshConfig
from jaxkit.sharding import resolve_rules

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
TESTS = Path(__file__).parent
# Faster XLA CPU compiles (the tests compare runs made with the same flags).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def worker_env(devices: int, cache_dir) -> dict:
    """Environment for a jax subprocess with `devices` CPU devices, sharing a
    persistent compilation cache so identical programs compile once. Its
    PYTHONPATH holds the tests folder, whose modules test scripts in
    subfolders import, and before it the repository root, so that jaxkit and
    pallas_kernels name the packages and not the test folders of those names."""
    path = os.pathsep.join(filter(None, [str(TESTS.parent), str(TESTS),
                                         os.environ.get("PYTHONPATH")]))
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
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


def session_dir(tmp_path_factory) -> Path:
    """A directory shared by the whole test session (all xdist workers too)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


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


def save_params(trainer, path: Path):
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
    from jaxkit.run.trainer import Trainer
    trainer = Trainer(load_config(None, TINY + overrides), run_dir, devices=devices, sources=sources)
    return trainer, trainer.fit(resume=resume)


def worker_eight_devices(out: Path):
    from jaxkit.run.build import build_data
    from jaxkit.config import load_config
    assert jax.device_count() == 8
    one = jax.devices()[:1]
    # Single-device reference, straight through.
    trainer, _ = _train(["checkpoint.enabled=false"], out / "ref", one)
    save_params(trainer, out / "ref" / "params.npz")
    # Single device again, preempted (SIGTERM) after step 3, then resumed.
    train_src, eval_src = build_data(load_config(None, TINY))
    _, result = _train([], out / "resumed", one, sources=(SignalAt(train_src, STOP_AT - 1), eval_src))
    assert result == {**result, "step": STOP_AT, "stopped_early": True}, result
    trainer, result = _train([], out / "resumed", one, resume=True)
    assert result["step"] == STEPS and not result["stopped_early"], result
    save_params(trainer, out / "resumed" / "params.npz")
    # Sharded runs; fsdp8 keeps a checkpoint at step 3 for the cross-mesh restore.
    layouts = {}
    for name, mesh in MESHES.items():
        ckpt = ["checkpoint.every=3"] if name == "fsdp8" else ["checkpoint.enabled=false"]
        trainer, _ = _train(mesh + ckpt, out / name, None)
        save_params(trainer, out / name / "params.npz")
        opt = trainer.state["opt_state"][1][0]  # clip_by_global_norm, then adamw's moments
        batch = trainer.batches.train(0)
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
