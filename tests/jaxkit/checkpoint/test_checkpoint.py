"""Checkpoints: exact resume after a preemption signal, retention policy, a
process killed mid-save, restore onto a different mesh, parameter export."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.checkpoint import Checkpointer
from jaxkit.config import CheckpointConfig
from multidevice import (STEPS, STOP_AT, TINY, assert_trees_close, load_tree, losses,
                         run_worker, worker_env)


def test_resume_after_sigterm_is_exact(eight_devices):
    # The worker ran 6 steps straight, and separately 3 steps ended by SIGTERM
    # (which saved step 3) followed by `resume` for 3 more, on one device.
    assert (eight_devices / "resumed" / "checkpoints" / str(STOP_AT)).is_dir()
    assert losses(eight_devices / "resumed") == losses(eight_devices / "ref")
    ref = load_tree(eight_devices / "ref" / "params.npz")
    resumed = load_tree(eight_devices / "resumed" / "params.npz")
    for k in ref:
        np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)


def test_keep_last_and_keep_every(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every=1, keep_last=2, keep_every=4))
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    for step in range(1, 11):
        assert ckpt.due(step)
        ckpt.save(step, {**state, "step": jnp.int32(step)})
    ckpt.save(10, {**state, "step": jnp.int32(-1)})  # already saved: left as it is
    ckpt.close()
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    assert ckpt.manager.all_steps() == [4, 8, 9, 10]
    restored = ckpt.restore(10, jax.eval_shape(lambda: state))
    assert int(restored["step"]) == 10
    np.testing.assert_array_equal(restored["w"], state["w"])
    ckpt.close()
    assert not Checkpointer(tmp_path, CheckpointConfig(every=0)).due(5)


def test_kill_during_async_save_keeps_previous_checkpoint(tmp_path, compile_cache):
    proc = subprocess.run([sys.executable, __file__, "kill_during_save", str(tmp_path)],
                          env=worker_env(1, compile_cache), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("2.")]
    assert leftovers and not (tmp_path / "2").exists(), sorted(p.name for p in tmp_path.iterdir())
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(1, jax.eval_shape(lambda: _big_state(1)))
    for k, v in _big_state(1).items():
        np.testing.assert_array_equal(restored[k], v, err_msg=k)
    ckpt.close()
    assert not any(p.name.startswith("2.") for p in tmp_path.iterdir())  # cleaned up on open


def test_restore_onto_another_mesh_and_export(eight_devices, tmp_path, compile_cache):
    # Saved at step 3 on 8 devices as fsdp=8; resumed on 4 devices as data=2, fsdp=2.
    run = tmp_path / "run"
    shutil.copytree(eight_devices / "fsdp8" / "checkpoints" / str(STOP_AT),
                    run / "checkpoints" / str(STOP_AT))
    run_worker("four_devices", run, 4, compile_cache, script=__file__)
    report = json.loads((run / "report.json").read_text())
    assert report["restored_step"] == STOP_AT
    assert report["embed"] == ["P('tensor', 'fsdp')", [64, 16]]
    assert report["mu_embed"] == ["P('tensor', 'fsdp')", [64, 16]]
    assert losses(run) == pytest.approx(losses(eight_devices / "ref")[STOP_AT:], rel=2e-6)
    ref = load_tree(eight_devices / "ref" / "params.npz")
    assert_trees_close(load_tree(run / "params.npz"), ref)
    exported = load_tree(run / "exported.npz")
    final = load_tree(run / "params.npz")
    for k in final:
        np.testing.assert_array_equal(exported[k], final[k], err_msg=k)


# ------------------------------------------------------------------ workers

def _big_state(seed: int) -> dict:
    """~64 MB, so that writing it outlasts the moment the worker kills itself."""
    rng = np.random.default_rng(seed)
    return {f"w{i}": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(16)}


def worker_kill_during_save(out: Path):
    import os
    ckpt = Checkpointer(out, CheckpointConfig(async_save=True))
    ckpt.save(1, {k: jnp.asarray(v) for k, v in _big_state(1).items()})
    ckpt.manager.wait_until_finished()
    ckpt.save(2, {k: jnp.asarray(v) for k, v in _big_state(2).items()})
    if (out / "2").exists():
        raise SystemExit("step 2 finished before the kill; make the state larger")
    os.kill(os.getpid(), signal.SIGKILL)


def worker_four_devices(run: Path):
    from flax import nnx

    from jaxkit.checkpoint import load_params
    from jaxkit.cli import main
    from jaxkit.config import load_config
    from jaxkit.run.build import build_model
    from jaxkit.run.trainer import Trainer
    from multidevice import save_params, save_tree

    assert jax.device_count() == 4
    cfg = load_config(None, TINY + ["mesh.data=2", "mesh.fsdp=2"])
    trainer = Trainer(cfg, run)
    step = trainer.restore_latest()
    embed, mu = trainer.state["params"]["embed"], trainer.state["opt_state"][1][0].mu["embed"]
    layout = lambda x: [repr(x.sharding.spec), list(x.sharding.shard_shape(x.shape))]
    result = trainer.fit(resume=True)
    assert result["step"] == STEPS, result
    save_params(trainer, run / "params.npz")
    (run / "report.json").write_text(json.dumps(
        dict(restored_step=step, embed=layout(embed), mu_embed=layout(mu))))
    # Export through the command line, then load into a fresh single-device model.
    main(["export", str(run / "config.yaml"), "--run-dir", str(run), "--out", str(run / "export")])
    model = load_params(run / "export", build_model(load_config(None, TINY)))
    save_tree(nnx.state(model, nnx.Param), run / "exported.npz")


if __name__ == "__main__":
    globals()[f"worker_{sys.argv[1]}"](Path(sys.argv[2]))


def test_checksums_are_written_in_the_background(tmp_path, monkeypatch):
    import threading

    from jaxkit.checkpoint import manager
    release, real = threading.Event(), manager.write_checksums

    def slow_write(step_dir):
        assert release.wait(60), "the test never released the checksum writer"
        real(step_dir)
    monkeypatch.setattr(manager, "write_checksums", slow_write)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every=1))
    state = {"w": jnp.arange(6.0)}
    ckpt.save(1, state)
    ckpt.save(2, state)  # returns while step 1's checksums are still being written
    assert not (tmp_path / "1" / "checksums.json").exists()
    release.set()
    ckpt.verify(1)  # waits for them
    ckpt.close()
    for step in (1, 2):
        assert (tmp_path / str(step) / "checksums.json").is_file()


@pytest.mark.parametrize("keep_last", [1, 2])
def test_retention_never_deletes_a_step_while_its_checksums_are_written(tmp_path, monkeypatch,
                                                                        keep_last):
    """Checksums slower than a save: the step a later save's retention removes
    has its checksums written first, so hashing never meets a vanishing file."""
    import time

    from jaxkit.checkpoint import manager
    real = manager.write_checksums

    def slow_write(step_dir):
        files = sorted(p for p in step_dir.rglob("*") if p.is_file())
        time.sleep(0.3)  # the next save commits (and applies retention) meanwhile
        assert all(p.is_file() for p in files), f"{step_dir} deleted while hashed"
        real(step_dir)
    monkeypatch.setattr(manager, "write_checksums", slow_write)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every=1, keep_last=keep_last))
    state = {"w": jnp.arange(6.0)}
    for step in range(1, 6):
        ckpt.save(step, state)
        time.sleep(0.1)
    ckpt.close()
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    assert ckpt.manager.all_steps() == list(range(6 - keep_last, 6))
    assert ckpt.latest_verified_step() == 5
    ckpt.close()
