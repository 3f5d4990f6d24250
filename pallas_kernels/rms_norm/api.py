"""Public RMSNorm and fused residual-add + RMSNorm entry points with
``implementation=`` dispatch.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the reference (reference.py), differentiated and, under jit,
               fused by XLA; not jitted here, so an eager call computes op
               by op like the rest of an eager model;
  'blockspec'  the portable Pallas kernels of blockspec.py with their own
               backward (compiled on a GPU, interpreted on CPU when asked);
               D <= 8192;
  'pallas'     'blockspec' (the only Pallas kernel of this op);
  'auto'       the reference, on every machine. The kernel moves first in
               the preference order only once the GPU benchmark
               (python -m pallas_kernels.rms_norm.bench) shows it faster
               than XLA's fusions at the models' shapes.
An implementation that cannot honour an argument raises; none is ignored.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.rms_norm import reference
from pallas_kernels.rms_norm.blockspec import (MAX_DIM, blockspec_add_rms_norm,
                                               blockspec_rms_norm)

DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def _blockspec_problem(args):
    if args.x.shape[-1] > MAX_DIM:
        return f"takes a last dimension of at most {MAX_DIM}, got {args.x.shape[-1]}"
    if args.x.size == 0:
        return f"takes at least one row, got x of shape {args.x.shape}"
    return None


TABLE = dispatch.Table("rms norm", {
    "xla": dispatch.takes_any,
    "blockspec": _blockspec_problem,
}, preference=("xla",))
IMPLEMENTATIONS = TABLE.names


def _check_dtype(name, a):
    if a.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")


def check_inputs(x, scale, delta=None):
    """Shapes and dtypes of rms_norm's and add_rms_norm's arrays."""
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., D] with D >= 1, got shape {x.shape}")
    _check_dtype("x", x)
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"scale shape {scale.shape} must be [D] = {x.shape[-1:]} (x shape "
                         f"{x.shape})")
    _check_dtype("scale", scale)
    if delta is not None:
        if delta.shape != x.shape:
            raise ValueError(f"delta shape {delta.shape} must equal x shape {x.shape}")
        if delta.dtype != x.dtype:
            raise ValueError(f"delta dtype {delta.dtype} must equal x dtype {x.dtype}")


def _resolve(implementation, interpret, eps, x):
    eps = dispatch.check_positive_real("eps", eps)
    return eps, TABLE.resolve(implementation, interpret, x=x)


def rms_norm(x, scale, *, eps: float, implementation: str = "auto",
             interpret: bool | None = None):
    """RMSNorm: x [..., D] / sqrt(mean(x**2) + eps) * scale [D], in float32,
    -> [..., D] in x.dtype. x float32, bfloat16 or float16; scale one of
    those; eps a finite float > 0. interpret (None: True off GPU) applies
    to the Pallas kernel only. Differentiable in x and scale."""
    x, scale = dispatch.as_array("x", x), dispatch.as_array("scale", scale)
    check_inputs(x, scale)
    eps, (impl, interpret) = _resolve(implementation, interpret, eps, x)
    if impl == "xla":
        return reference.rms_norm(x, scale, eps)
    return blockspec_rms_norm(x, scale, eps=eps, interpret=interpret)


def add_rms_norm(x, delta, scale, *, eps: float, implementation: str = "auto",
                 interpret: bool | None = None):
    """A residual add and the norm after it -> (x + delta in x.dtype,
    rms_norm of that sum), the kernel writing both in one pass. delta has
    x's shape and dtype; the rest as rms_norm. Differentiable in x, delta
    and scale: x and delta both get the sum's total gradient."""
    x, delta = dispatch.as_array("x", x), dispatch.as_array("delta", delta)
    scale = dispatch.as_array("scale", scale)
    check_inputs(x, scale, delta)
    eps, (impl, interpret) = _resolve(implementation, interpret, eps, x)
    if impl == "xla":
        return reference.add_rms_norm(x, delta, scale, eps)
    return blockspec_add_rms_norm(x, delta, scale, eps=eps, interpret=interpret)
