"""Test modes: every kernel test body runs interpreted on CPU and, where a GPU
is present, compiled (tests marked ``gpu``). Without a GPU the compiled
variants are deselected, not skipped: CI reports only what it really ran."""

import fcntl
import os
from pathlib import Path

# Several xdist workers share one GPU: each preallocating most of its memory
# made the later ones fail with CUDA out-of-memory errors.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting
import pytest  # noqa: E402

from multidevice import run_worker, session_dir  # noqa: E402

HAS_GPU = jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("gpu") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def kernel_modes():
    """Parametrize values for a kernel test: interpreted always, compiled on GPU."""
    return [pytest.param(True, id="interpret"),
            pytest.param(False, id="compiled", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True, scope="session")
def _float32_matmuls():
    # Full-precision dots so tolerance checks mean what they say.
    with jax.default_matmul_precision("highest"):
        yield



@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    """A persistent jax compilation cache shared by the session's subprocesses."""
    path = session_dir(tmp_path_factory) / "jax_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory, compile_cache) -> Path:
    """Runs the 8-device worker (multidevice.py) once per session, xdist
    workers waiting for each other on a lock; returns its output directory."""
    out = session_dir(tmp_path_factory) / "eight_devices"
    out.mkdir(exist_ok=True)
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            run_worker("eight_devices", out, 8, compile_cache)
            (out / "done").touch()
    return out
