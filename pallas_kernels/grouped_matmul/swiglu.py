"""A SwiGLU feed-forward over grouped rows (an MoE layer's experts):

    swiglu_ffn(lhs [M,D], w_gate [G,D,H], w_up [G,D,H], w_down [G,H,D], group_sizes [G])
      = gmm(silu(gate) * up, w_down) -> [M,D],  gate = gmm(lhs, w_gate), up = gmm(lhs, w_up)

rounded as the unfused layers round it: gate, up, h = silu(gate) * up and
the output to lhs.dtype, the SwiGLU in float32 (``swiglu_ffn_reference`` is
the spec).

implementation, interpret and consumers are gmm's (api.py). With
'mosaic_gpu' (or 'pallas'/'auto' resolving to it) and consumers=2 the SwiGLU
and its gradient run in the grouped matmuls' epilogues (two_consumers.gmm):
the gate and up weights go in as one matrix whose columns interleave them in
blocks of b (``interleave``); the first grouped matmul writes the
projections and h (swiglu=True); in the backward the down projection's
d-input grouped matmul forms dh tile by tile and writes the SwiGLU's
gradient with respect to the projections instead of dh (gate_up=...). So
neither the SwiGLU nor its gradient makes a pass of its own over the
[M, 2H] projections. That needs H to be a multiple of b, half the first
kernel's column tile (``tiling``, default ``DEFAULT_TILING``); the other
grouped matmuls run at their default tilings. Every other case is gmm, XLA's
SwiGLU and gmm, differentiated through gmm's VJP: the same math. fused: None
fuses where the kernels take the call, False never, True raises where they
cannot.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import api, two_consumers
from pallas_kernels.grouped_matmul.reference import gmm_reference

# The first kernel's tiling when none is given (rows, K, N): the two-consumer
# gmm's (docs/design/grouped-matmul.md has the alternatives' shared-memory
# budgets; bench --swiglu times them).
DEFAULT_TILING = two_consumers.DEFAULT_TILING


def swiglu(gate, up):
    """silu(gate) * up in float32 (the layers' activation)."""
    gate = gate.astype(jnp.float32)
    return jax.nn.silu(gate) * up.astype(jnp.float32)


def swiglu_ffn_reference(lhs, w_gate, w_up, w_down, group_sizes):
    """The spec: [M, D] in lhs.dtype."""
    h = swiglu(gmm_reference(lhs, w_gate, group_sizes), gmm_reference(lhs, w_up, group_sizes))
    return gmm_reference(h.astype(lhs.dtype), w_down, group_sizes)


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
    gate_up [M, 2H], given dh [M, H]; float32, interleaved (what the
    d-input kernel's epilogue computes)."""
    m, h2 = gate_up.shape
    x = gate_up.astype(jnp.float32).reshape(m, h2 // (2 * block), 2, block)
    gate, up = x[:, :, 0], x[:, :, 1]
    dh = dh.astype(jnp.float32).reshape(m, h2 // (2 * block), block)
    sig = jax.nn.sigmoid(gate)
    dgate = dh * up * sig * (1 + gate * (1 - sig))
    dup = dh * gate * sig
    return jnp.stack([dgate, dup], axis=2).reshape(m, h2)


class Kernels(NamedTuple):
    """The fused path's kernels (static; tests swap in others), rows grouped
    by group_sizes throughout:
    gate_up(lhs, w, sizes) -> (the interleaved projections, h);
    down(h, w_down, sizes) -> the output;
    grad(dy, w_down^T [G, D, H], gate_up, sizes) -> the SwiGLU's gradient
        with respect to gate_up (interleaved), dh never in memory;
    dlhs(dgate_up, w, sizes) -> dgate_up @ w^T per group;
    tgmm(a, b, sizes) -> a^T @ b per group."""
    gate_up: Callable
    down: Callable
    grad: Callable
    dlhs: Callable
    tgmm: Callable
    block: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(lhs, w_gate, w_up, w_down, group_sizes, kernels: Kernels):
    return _fused_fwd(lhs, w_gate, w_up, w_down, group_sizes, kernels)[0]


def _fused_fwd(lhs, w_gate, w_up, w_down, group_sizes, kernels):
    w = interleave(w_gate, w_up, kernels.block)
    gate_up, h = kernels.gate_up(lhs, w, group_sizes)
    out = kernels.down(h, w_down, group_sizes)
    return out, (lhs, w, w_down, group_sizes, gate_up, h)


def _fused_bwd(kernels, residuals, dout):
    lhs, w, w_down, group_sizes, gate_up, h = residuals
    dout = dout.astype(lhs.dtype)
    dgate_up = kernels.grad(dout, jnp.swapaxes(w_down, 1, 2), gate_up, group_sizes)
    dw_down = kernels.tgmm(h, dout, group_sizes)
    dlhs = kernels.dlhs(dgate_up, w, group_sizes)
    dw_gate, dw_up = deinterleave(kernels.tgmm(lhs, dgate_up, group_sizes), kernels.block)
    return dlhs, dw_gate, dw_up, dw_down, None


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.jit, static_argnums=3)
def _gate_up_kernel(lhs, w, group_sizes, tiling):
    return two_consumers.gmm(lhs, w, group_sizes, out_dtype=lhs.dtype, tiling=tiling,
                             swiglu=True)


@functools.partial(jax.jit, static_argnums=4)
def _grad_kernel(dout, w_down_t, gate_up, group_sizes, tiling):
    return two_consumers.gmm(dout, w_down_t, group_sizes, out_dtype=dout.dtype, tiling=tiling,
                             gate_up=gate_up)


@functools.cache
def mosaic_kernels(cfg) -> Kernels:
    """The Hopper kernels of the fused path for gmm's resolved settings
    ``cfg``: the epilogue kernels at cfg's tiling (the first) and at
    (128, 64, b) (the gradient's: a dh tile of b columns is one gate block
    and its up block); the plain ones at their defaults."""
    tiling = cfg.tiling or DEFAULT_TILING
    block = tiling[2] // 2
    plain = cfg._replace(tiling=None)
    return Kernels(gate_up=functools.partial(_gate_up_kernel, tiling=tiling),
                   down=functools.partial(api._gmm_kernel, cfg=plain),
                   grad=functools.partial(_grad_kernel, tiling=(128, 64, block)),
                   dlhs=functools.partial(api._gmm_kernel,
                                          cfg=plain._replace(transpose_rhs=True)),
                   tgmm=functools.partial(api._tgmm_kernel, cfg=plain),
                   block=block)


def fusion_problem(impl: str, cfg, hidden: int) -> str | None:
    """Why the resolved call cannot take the SwiGLU epilogues, or None."""
    if impl != "pallas" or cfg.kernel.name != "mosaic_gpu":
        return f"the SwiGLU epilogues are Mosaic GPU kernels'; this call runs {impl!r}"
    if cfg.consumers != 2:
        return "the SwiGLU epilogues are the two-consumer kernels' (consumers=2)"
    # An explicit tiling the two-consumer gmm cannot take was refused by the
    # dispatch (or sent the call elsewhere) before this.
    tiling = cfg.tiling or DEFAULT_TILING
    if hidden % (tiling[2] // 2) or (tiling[2] // 2) % 64:
        return (f"the SwiGLU epilogues need the hidden size {hidden} to be a multiple of "
                f"half the column tile ({tiling[2] // 2}), itself a multiple of 64")
    return None


def swiglu_ffn(lhs, w_gate, w_up, w_down, group_sizes, *, implementation: str = "auto",
               tiling=None, interpret: bool | None = None, consumers: int = 1,
               fused: bool | None = None):
    """gmm(silu(gmm(lhs, w_gate)) * gmm(lhs, w_up), w_down) -> [M, D] in
    lhs.dtype (see the module docstring)."""
    lhs, group_sizes, tiling = api._check_common(lhs, group_sizes, tiling, None, consumers)
    w_gate, w_up, w_down = (api.dispatch.as_array(name, w) for name, w in
                            (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
    g, d = group_sizes.shape[0], lhs.shape[1]
    if w_gate.ndim != 3 or w_gate.shape[:2] != (g, d) or w_up.shape != w_gate.shape:
        raise ValueError(f"w_gate and w_up must both be [G, D, H] with G={g}, D={d}; got "
                         f"{w_gate.shape} and {w_up.shape}")
    if w_down.shape != (g, w_gate.shape[2], d):
        raise ValueError(f"w_down must be [G, H, D] = {(g, w_gate.shape[2], d)}; got "
                         f"{w_down.shape}")
    if any(w.dtype != lhs.dtype for w in (w_gate, w_up, w_down)):
        raise ValueError(f"the weights must have lhs's dtype {lhs.dtype}; got {w_gate.dtype}, "
                         f"{w_up.dtype}, {w_down.dtype}")
    if fused is not None:
        api.dispatch.check_flag("fused", fused)
    impl, cfg = api._resolve(implementation, lhs.dtype, None, tiling, interpret, consumers,
                             "gmm")
    problem = fusion_problem(impl, cfg, w_gate.shape[2])
    if fused and problem:
        raise ValueError(f"fused=True cannot be honoured: {problem}")
    if fused is not False and problem is None:
        return _fused(lhs, w_gate, w_up, w_down, group_sizes, mosaic_kernels(cfg))
    kw = dict(implementation=implementation, tiling=tiling, interpret=interpret,
              consumers=consumers, preferred_element_type=lhs.dtype)
    gate, up = jnp.split(api.gmm(lhs, jnp.concatenate([w_gate, w_up], axis=-1), group_sizes,
                                 **kw), 2, axis=-1)
    return api.gmm(swiglu(gate, up).astype(lhs.dtype), w_down, group_sizes, **kw)
