"""Test modes: every kernel test body runs interpreted on CPU and, where a GPU
is present, compiled (tests marked ``gpu``). Without a GPU the compiled
variants are deselected, not skipped: CI reports only what it really ran."""

import os

# Several xdist workers share one GPU: each preallocating most of its memory
# made the later ones fail with CUDA out-of-memory errors.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting
import pytest

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

