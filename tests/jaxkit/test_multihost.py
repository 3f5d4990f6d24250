"""Two CPU processes joined through jax.distributed (gloo collectives), each
with 2 devices and feeding only its half of every global batch, train
exactly as one process on one device does."""
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import orbax.checkpoint as ocp

from jaxkit.config import load_config, save_config
from jaxkit.run.export import export_run
from jaxkit.sharding.state import path_str
from multidevice import STEPS, TINY, assert_trees_close, load_tree, losses, worker_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(eight_devices, tmp_path, compile_cache):
    config = tmp_path / "tiny.yaml"
    save_config(load_config(None, TINY), config)
    run, port = tmp_path / "run", _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxkit.cli", "train", str(config), "--run-dir", str(run),
         "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=worker_env(2, compile_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out}\n{err[-5000:]}"
    # Only process 0 prints its result and logs metrics.
    assert f'"step": {STEPS}' in outputs[0][0] and '"step"' not in outputs[1][0]
    np.testing.assert_allclose(losses(run), losses(eight_devices / "ref"), rtol=2e-6)
    # The checkpoint written by both processes, exported here on one device.
    cfg = load_config(run / "config.yaml", ["mesh.data=-1", "mesh.fsdp=1"])
    assert export_run(cfg, run, tmp_path / "export") == STEPS
    with ocp.StandardCheckpointer() as checkpointer:
        exported = checkpointer.restore((tmp_path / "export").absolute())
    flat = {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(exported)[0]}
    assert_trees_close(flat, load_tree(eight_devices / "ref" / "params.npz"))


def test_distributed_flags_are_checked(monkeypatch):
    from jaxkit.distributed import initialize
    for var in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert initialize("auto") is False  # a lone process: nothing to join
    with pytest.raises(ValueError, match="go together"):
        initialize("auto", coordinator="localhost:1234")
    with pytest.raises(ValueError, match=r"--process-id 2 must lie in \[0, 2\)"):
        initialize("auto", "localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="contradicts"):
        initialize("off", "localhost:1234", 2, 0)
    with pytest.raises(ValueError, match="auto, on or off"):
        initialize("yes")
