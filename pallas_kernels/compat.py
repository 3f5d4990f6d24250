"""The one place that knows how the JAX/Pallas API differs between versions.

jaxkit supports jax 0.10.2 (CPU CI) and 0.11.2 (GPU machine). Kernels import
version-dependent names from here instead of testing versions themselves.
"""
from __future__ import annotations

import functools

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


@functools.cache
def platform() -> str:
    """Default backend platform: 'cpu', 'gpu' or 'tpu'."""
    return jax.default_backend()


@functools.cache
def device_kind() -> str:
    """Kind string of the first device, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'."""
    return jax.devices()[0].device_kind


def is_hopper() -> bool:
    """True on an sm_90 GPU (H100/H200), where the Mosaic GPU kernels run."""
    if platform() != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", "")
    return str(cc).startswith("9")
