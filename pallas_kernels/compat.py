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


def sm_count() -> int:
    """Streaming multiprocessors of the first device; lowering for CUDA without
    a GPU (the CPU tests) falls back to the H100's 132."""
    return getattr(jax.devices()[0], "core_count", 0) or 132


def is_hopper() -> bool:
    """True on an sm_90 GPU (H100/H200), where the Mosaic GPU kernels run."""
    if platform() != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", "")
    return str(cc).startswith("9")


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """Compiler params that send a BlockSpec pallas_call to Pallas's Triton
    lowering, named explicitly because the default GPU backend may be Mosaic GPU
    (jax 0.11 deprecates the Triton path but keeps it)."""
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mosaic_gpu_interpret_params():
    """Parameters that run a Mosaic GPU kernel in JAX's GPU interpreter (on CPU).

    Out-of-bounds reads return the uninitialised fill (NaN) instead of raising,
    standing in for the TMA zero fill of partial tiles; kernels must keep such
    values out of stored results. Public in jax 0.11, private in 0.10.
    """
    try:
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


# jax 0.10's GPU interpreter rejects transposed wgmma operands and fills whole
# partial blocks (not just their out-of-bounds part) on out-of-bounds reads.
MOSAIC_GPU_INTERPRET_FULL = JAX_VERSION >= (0, 11)
