"""A SwiGLU feed-forward's first grouped matmul with its activation:

    gmm_swiglu(lhs [M,K], w_gate [G,K,H], w_up [G,K,H], group_sizes [G]) -> h [M,H]
    h = silu(gate) * up,  gate = gmm(lhs, w_gate), up = gmm(lhs, w_up)

rounded as the unfused layers round it: gate and up to lhs.dtype, the SwiGLU
in float32, h to lhs.dtype (``gmm_swiglu_reference`` is the spec).

implementation, tiling, interpret and consumers are gmm's (api.py). With
'mosaic_gpu' (or 'pallas'/'auto' resolving to it) and consumers=2, the
SwiGLU runs in the grouped matmul's epilogue (``two_consumers.gmm(...,
swiglu=True)``): the gate and up weights go in as one matrix whose columns
interleave them in blocks of half the column tile, so each output tile holds
a gate block and its up block; the kernel writes the projections (the
backward reads them) and h, and no pass over the [M, 2H] projections is left
to XLA. That needs H to be a multiple of the block. Every other case runs
gmm on the concatenated weights, then the SwiGLU in XLA: the same math.
fused: None fuses where the kernel takes the call, False never does, True
raises where it cannot.

Gradient (the fused path's custom VJP): d-gate and d-up from dh and the saved
projections (one XLA fusion, in the interleaved layout), then gmm's d-lhs and
tgmm kernels (two consumers, their default tilings) on that layout, whose
weight gradient is split back into the gate's and the up projection's.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import api, two_consumers
from pallas_kernels.grouped_matmul.reference import gmm_reference

# The epilogue kernel's tiling when none is given (rows, K, N): the
# two-consumer gmm's (docs/design/grouped-matmul.md has the alternatives'
# shared-memory budgets; bench --swiglu times them).
DEFAULT_TILING = two_consumers.DEFAULT_TILING


def swiglu(gate, up):
    """silu(gate) * up in float32 (the layers' activation)."""
    gate = gate.astype(jnp.float32)
    return jax.nn.silu(gate) * up.astype(jnp.float32)


def gmm_swiglu_reference(lhs, w_gate, w_up, group_sizes):
    """The spec: h [M, H] in lhs.dtype."""
    gate = gmm_reference(lhs, w_gate, group_sizes)
    up = gmm_reference(lhs, w_up, group_sizes)
    return swiglu(gate, up).astype(lhs.dtype)


def interleave(gate, up, block: int):
    """[..., H] and [..., H] -> [..., 2H]: block b of the gate's columns, then
    block b of up's, for each block of ``block`` columns."""
    *lead, h = gate.shape
    split = lambda x: x.reshape(*lead, h // block, 1, block)
    return jnp.concatenate([split(gate), split(up)], axis=-2).reshape(*lead, 2 * h)


def deinterleave(x, block: int):
    """interleave's inverse: [..., 2H] -> ([..., H], [..., H])."""
    *lead, h2 = x.shape
    x = x.reshape(*lead, h2 // (2 * block), 2, block)
    return x[..., 0, :].reshape(*lead, h2 // 2), x[..., 1, :].reshape(*lead, h2 // 2)


def swiglu_grad(gate_up, dh, block: int):
    """d(silu(gate) * up) with respect to the interleaved projections
    gate_up [M, 2H], given dh [M, H]; float32, interleaved."""
    m, h2 = gate_up.shape
    x = gate_up.astype(jnp.float32).reshape(m, h2 // (2 * block), 2, block)
    gate, up = x[:, :, 0], x[:, :, 1]
    dh = dh.astype(jnp.float32).reshape(m, h2 // (2 * block), block)
    sig = jax.nn.sigmoid(gate)
    dgate = dh * up * sig * (1 + gate * (1 - sig))
    dup = dh * gate * sig
    return jnp.stack([dgate, dup], axis=2).reshape(m, h2)


class Kernels(NamedTuple):
    """The fused path's three kernels (static; tests swap in others):
    forward(lhs, w, sizes) -> (gate_up, h); dlhs(dgate_up, w, sizes) ->
    dgate_up @ w^T per group; dw(lhs, dgate_up, sizes) -> [G, K, 2H]."""
    forward: Callable
    dlhs: Callable
    dw: Callable
    block: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(lhs, w_gate, w_up, group_sizes, kernels: Kernels):
    return _fused_fwd(lhs, w_gate, w_up, group_sizes, kernels)[0]


def _fused_fwd(lhs, w_gate, w_up, group_sizes, kernels):
    w = interleave(w_gate, w_up, kernels.block)
    gate_up, h = kernels.forward(lhs, w, group_sizes)
    return h, (lhs, w, group_sizes, gate_up)


def _fused_bwd(kernels, residuals, dh):
    lhs, w, group_sizes, gate_up = residuals
    dgate_up = swiglu_grad(gate_up, dh, kernels.block).astype(lhs.dtype)
    dlhs = kernels.dlhs(dgate_up, w, group_sizes)
    dw_gate, dw_up = deinterleave(kernels.dw(lhs, dgate_up, group_sizes), kernels.block)
    return dlhs, dw_gate, dw_up, None


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.jit, static_argnums=3)
def _swiglu_kernel(lhs, w, group_sizes, cfg):
    return two_consumers.gmm(lhs, w, group_sizes, out_dtype=cfg.out_dtype,
                             tiling=cfg.tiling or DEFAULT_TILING, swiglu=True)


@functools.cache
def mosaic_kernels(cfg) -> Kernels:
    """The Hopper kernels of the fused path for gmm's resolved settings
    ``cfg``. The tiling is the epilogue kernel's; the backward's grouped
    matmuls run at their own defaults (tgmm's cannot take every gmm tiling)."""
    return Kernels(forward=functools.partial(_swiglu_kernel, cfg=cfg),
                   dlhs=functools.partial(api._gmm_kernel,
                                          cfg=cfg._replace(transpose_rhs=True, tiling=None)),
                   dw=functools.partial(api._tgmm_kernel, cfg=cfg._replace(tiling=None)),
                   block=(cfg.tiling or DEFAULT_TILING)[2] // 2)


def fusion_problem(impl: str, cfg, hidden: int) -> str | None:
    """Why the resolved call cannot take the SwiGLU epilogue, or None."""
    if impl != "pallas" or cfg.kernel.name != "mosaic_gpu":
        return f"the SwiGLU epilogue is a Mosaic GPU kernel's; this call runs {impl!r}"
    if cfg.consumers != 2:
        return "the SwiGLU epilogue is the two-consumer kernel's (consumers=2)"
    block = (cfg.tiling or DEFAULT_TILING)[2] // 2
    if hidden % block:
        return (f"the SwiGLU epilogue needs the hidden size {hidden} to be a multiple of "
                f"half the column tile ({block})")
    return None


def gmm_swiglu(lhs, w_gate, w_up, group_sizes, *, implementation: str = "auto", tiling=None,
               interpret: bool | None = None, consumers: int = 1, fused: bool | None = None):
    """silu(gmm(lhs, w_gate)) * gmm(lhs, w_up) -> [M, H] in lhs.dtype (see the
    module docstring)."""
    lhs, group_sizes, tiling = api._check_common(lhs, group_sizes, tiling, None, consumers)
    w_gate, w_up = api.dispatch.as_array("w_gate", w_gate), api.dispatch.as_array("w_up", w_up)
    if w_gate.shape != w_up.shape or w_gate.ndim != 3:
        raise ValueError(f"w_gate and w_up must both be [G, K, H]; got {w_gate.shape} and "
                         f"{w_up.shape}")
    if fused is not None:
        api.dispatch.check_flag("fused", fused)
    impl, cfg = api._resolve(implementation, lhs.dtype, None, tiling, interpret, consumers,
                             "gmm")
    problem = fusion_problem(impl, cfg, w_gate.shape[2])
    if fused and problem:
        raise ValueError(f"fused=True cannot be honoured: {problem}")
    if fused is not False and problem is None:
        if w_gate.dtype != lhs.dtype or w_up.dtype != lhs.dtype:
            raise ValueError(f"lhs and weight dtypes differ: {lhs.dtype} vs {w_gate.dtype}, "
                             f"{w_up.dtype}")
        if w_gate.shape[1] != lhs.shape[1] or w_gate.shape[0] != group_sizes.shape[0]:
            raise ValueError(f"w_gate {w_gate.shape} does not fit lhs {lhs.shape} and "
                             f"{group_sizes.shape[0]} groups")
        return _fused(lhs, w_gate, w_up, group_sizes, mosaic_kernels(cfg))
    gate_up = api.gmm(lhs, jnp.concatenate([w_gate, w_up], axis=-1), group_sizes,
                      implementation=implementation, tiling=tiling, interpret=interpret,
                      consumers=consumers, preferred_element_type=lhs.dtype)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return swiglu(gate, up).astype(lhs.dtype)
