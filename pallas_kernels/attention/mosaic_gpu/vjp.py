"""The differentiable entry point: argument checks, padding, and the custom
VJP that runs the forward kernel and a backward plan."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.attention import tuning
from pallas_kernels.attention.mosaic_gpu.backward_keys import backward_dkv, backward_dkv_roles
from pallas_kernels.attention.mosaic_gpu.backward_queries import (backward_dq, backward_dq_roles,
                                                                  dq_folds_delta)
from pallas_kernels.attention.mosaic_gpu.common import CONSUMERS, HEAD_DIMS, Spec
from pallas_kernels.attention.mosaic_gpu.forward import forward
from pallas_kernels.shapes import pad_axis_to_multiple


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segs, spec):
    return forward(q, k, v, segs, spec)[0]


def _attention_fwd(q, k, v, segs, spec):
    out, lse = forward(q, k, v, segs, spec)
    return out, (q, k, v, segs, out, lse)


def _xla_delta(do, out):
    """delta = rowsum(dO*O) [B,H,Sp] in float32, by XLA."""
    return jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))


def _two_kernels(q, k, v, segs, out, lse, do, spec):
    dq, delta = backward_dq(q, k, v, do, lse, out, segs, spec, fold=True)
    dk, dv = backward_dkv(q, k, v, do, lse, delta, segs, spec)
    return dq, dk, dv


def _two_kernels_xla_delta(q, k, v, segs, out, lse, do, spec):
    args = (q, k, v, do, lse, _xla_delta(do, out), segs, spec)
    dq, _ = backward_dq(*args, fold=False)
    return (dq, *backward_dkv(*args))


def _role_split(q, k, v, segs, out, lse, do, spec):
    args = (q, k, v, do, lse, _xla_delta(do, out), segs, spec)
    return (backward_dq_roles(*args), *backward_dkv_roles(*args))


def _fused(q, k, v, segs, out, lse, do, spec):
    args = (q, k, v, do, lse, _xla_delta(do, out), segs, spec)
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = backward_dkv(*args, dq_acc=dq_acc)
    return (dq_acc[...] * spec.scale).astype(q.dtype), dk, dv


def _fused_dv_pass(q, k, v, segs, out, lse, do, spec):
    args = (q, k, v, do, lse, _xla_delta(do, out), segs, spec)
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, _ = backward_dkv(*args, want_dv=False, dq_acc=dq_acc)
    _, dv = backward_dkv(*args, want_dk=False)
    return (dq_acc[...] * spec.scale).astype(q.dtype), dk, dv


# The backward plans by name (``tuning.BACKWARD_HEAD_DIMS`` says what each is):
# residuals, dO and the spec -> dQ, dK, dV.
BACKWARD_PLANS = {
    "two_kernels": _two_kernels,
    "two_kernels_xla_delta": _two_kernels_xla_delta,
    "role_split": _role_split,
    "fused": _fused,
    "fused_dv_pass": _fused_dv_pass,
}


def _attention_bwd(spec, res, do):
    dq, dk, dv = BACKWARD_PLANS[spec.blocks.backward](*res, do, spec)
    return dq, dk, dv, None  # segment ids are integers: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def supports(q, k, v, *, causal=False, segment_ids=None, sliding_window=None,
             logit_softcap=None, scale=None) -> str | None:
    """None when ``mosaic_flash_attention`` handles this call, else the reason
    (the arguments' first: they are the same on every machine)."""
    del causal, scale
    problem = argument_problem(q, k, v, segment_ids, sliding_window, logit_softcap)
    if problem is None and not compat.is_hopper():
        problem = "the Mosaic GPU kernel needs a Hopper (sm_90) GPU"
    return problem


def argument_problem(q, k, v, segment_ids, sliding_window, logit_softcap) -> str | None:
    if sliding_window is not None and sliding_window < 1:
        return f"sliding_window must be >= 1, got {sliding_window}"
    if logit_softcap is not None and not logit_softcap > 0:
        return f"logit_softcap must be > 0, got {logit_softcap}"
    if segment_ids is not None:
        if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
            return "segment_ids must be a pair (q ids [B,S], kv ids [B,T])"
        q_seg, kv_seg = segment_ids
        if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
            return (f"segment ids shapes {q_seg.shape}, {kv_seg.shape} must be [B,S] "
                    f"{q.shape[:2]} and [B,T] {k.shape[:2]}")
        if not (jnp.issubdtype(q_seg.dtype, jnp.integer)
                and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
            return f"segment ids must be integers; got {q_seg.dtype}, {kv_seg.dtype}"
    return shape_problem(q, k, v)


def shape_problem(q, k, v) -> str | None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        return f"expected q [B,S,H,D] and k, v [B,T,KH,D]; got {q.shape}, {k.shape}, {v.shape}"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"the Mosaic GPU kernel needs bfloat16 or float16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return f"head_dim must be one of {HEAD_DIMS}; got {q.shape[-1]}"
    if q.shape[0] != k.shape[0] or q.shape[2] % k.shape[2]:
        return f"batch or heads of q {q.shape} and k {k.shape} do not match (kv heads must divide heads)"
    return None


def mosaic_flash_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None,
                           logit_softcap=None, scale=None,
                           block_sizes: tuning.MosaicBlockSizes | None = None):
    """Attention out [B,S,H,D] from the Hopper kernels, differentiable in q, k, v.

    segment_ids: None or a pair (q ids [B,S], kv ids [B,T]) of integers;
    block_sizes (tiling and backward plan) overrides the tuning table (see
    ``tuning.py``)."""
    problem = argument_problem(q, k, v, segment_ids, sliding_window, logit_softcap)
    if problem:
        raise ValueError(problem)
    S, T, D = q.shape[1], k.shape[1], q.shape[-1]
    if block_sizes is None:
        block_sizes = tuning.block_sizes_for(compat.device_kind(), D, causal)
    plan = block_sizes.backward
    if D not in tuning.BACKWARD_HEAD_DIMS[plan]:
        raise ValueError(f"backward plan {plan!r} takes head_dim "
                         f"{tuning.BACKWARD_HEAD_DIMS[plan]}; got head_dim={D}")
    for name in ("dq", "dkv"):  # head_dim 256's role-split kernels are sized for 64x64
        blocks = getattr(block_sizes, name)
        if D == 256 and (blocks.block_q, blocks.block_kv) != (64, 64):
            raise ValueError(f"head_dim 256's backward kernels take 64x64 blocks (shared memory "
                             f"and registers are full); got {name}={blocks}")
    spec = Spec(q_len=S, kv_len=T, causal=bool(causal), window=sliding_window,
                scale=float(D ** -0.5 if scale is None else scale), blocks=block_sizes,
                softcap=None if logit_softcap is None else float(logit_softcap),
                segments=segment_ids is not None)
    if plan == "two_kernels" and not dq_folds_delta(spec, D, q.dtype):
        raise ValueError(f"backward plan 'two_kernels' needs shared memory for an O tile in the "
                         f"dQ kernel, which dq={block_sizes.dq} at head_dim {D} leaves none; "
                         f"use 'two_kernels_xla_delta'")
    bs = block_sizes
    q_mult = math.lcm(CONSUMERS * bs.fwd.block_q, CONSUMERS * bs.dq.block_q, bs.dkv.block_q)
    kv_mult = math.lcm(bs.fwd.block_kv, bs.dq.block_kv, CONSUMERS * bs.dkv.block_kv)
    # Padding repeats the last id: sorted ids stay sorted, so the segment spans
    # still narrow the block ranges (padded keys are masked, padded rows dropped).
    segs = None if segment_ids is None else (
        pad_axis_to_multiple(segment_ids[0].astype(jnp.int32), 1, q_mult, mode="edge"),
        pad_axis_to_multiple(segment_ids[1].astype(jnp.int32), 1, kv_mult, mode="edge"))
    out = _attention(pad_axis_to_multiple(q, 1, q_mult), pad_axis_to_multiple(k, 1, kv_mult),
                     pad_axis_to_multiple(v, 1, kv_mult), segs, spec)
    return out[:, :S]
