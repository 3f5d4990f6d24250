"""Public gated linear attention entry point with ``implementation=`` dispatch.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the chunked jnp form of chunked.py (differentiated by XLA);
               a per-head or a per-key decay;
  'blockspec'  the portable chunked Pallas kernel of blockspec.py with its
               own backward (compiled on a GPU, interpreted on CPU); a
               per-head decay only;
  'pallas'     'blockspec' (the only Pallas kernel of this op);
  'auto'       'pallas' on GPU where it takes the call, else 'xla'.
An implementation that cannot honour an argument raises; none is ignored.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.linear_attention.blockspec import MIN_BLOCK, blockspec_linear_attention
from pallas_kernels.linear_attention.chunked import xla_linear_attention

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _blockspec_problem(args):
    if args.log_decay.ndim == 4:
        return ("takes a per-head log_decay [B, S, H] only; a per-key one [B, S, H, Dk] runs on "
                "'xla'")
    return None


TABLE = dispatch.Table("linear attention", {
    "xla": dispatch.takes_any,
    "blockspec": _blockspec_problem,
}, preference=("pallas", "xla"))
IMPLEMENTATIONS = TABLE.names


def check_chunk_size(chunk_size) -> int:
    """chunk_size as an int: a power of two >= 16 (a GPU matrix tile)."""
    chunk_size = dispatch.check_size("chunk_size", chunk_size, minimum=MIN_BLOCK)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {MIN_BLOCK}, got {chunk_size}")
    return chunk_size


def check_inputs(q, k, v, log_decay, initial_state):
    """Shapes and dtypes of linear_attention's arrays (see its docstring)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, len, heads, dim]; got shapes {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {k.shape} must equal q shape {q.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {v.shape} must share [batch, len, heads] with q {q.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float32, bfloat16 or float16")
    if log_decay.shape not in (q.shape[:3], q.shape):
        raise ValueError(f"log_decay shape {log_decay.shape} must be [batch, len, heads] "
                         f"{q.shape[:3]} or [batch, len, heads, key_dim] {q.shape}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
        raise ValueError(f"log_decay must have a float dtype, got {log_decay.dtype}")
    if initial_state is not None:
        B, _, H, Dk = q.shape
        want = (B, H, Dk, v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(f"initial_state shape {initial_state.shape} must be [batch, heads, "
                             f"key_dim, value_dim] {want}")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"initial_state must have a float dtype, got {initial_state.dtype}")


def linear_attention(q, k, v, log_decay, initial_state=None, *, scale: float | None = None,
                     chunk_size: int = 64, implementation: str = "auto",
                     interpret: bool | None = None):
    """Causal gated linear attention (GLA) -> (out [B,S,H,Dv] in q.dtype,
    final state [B,H,Dk,Dv] float32).

    q, k [B,S,H,Dk], v [B,S,H,Dv]: jax or NumPy arrays of one float dtype.
    log_decay: [B,S,H] (one decay per head) or [B,S,H,Dk] (one per key
    dimension), the log of each token's state decay; <= 0 keeps every
    exponent of the chunked forms <= 0. initial_state [B,H,Dk,Dv] (zeros when
    None) is the state before the first token: pass a previous call's final
    state to continue a sequence. For each token t:

        S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

    scale (a finite float > 0) defaults to Dk**-0.5. chunk_size (a power of
    two >= 16) is the length of the chunks the sequence is cut into; a
    sequence that is not a multiple is padded. interpret (None: True off GPU)
    applies to the Pallas kernel only. Differentiable in q, k, v, log_decay
    and initial_state.
    """
    q, k, v, log_decay = (dispatch.as_array(name, a) for name, a in
                          (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)))
    if initial_state is not None:
        initial_state = dispatch.as_array("initial_state", initial_state)
    check_inputs(q, k, v, log_decay, initial_state)
    chunk_size = check_chunk_size(chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else dispatch.check_positive_real("scale", scale)
    impl, interpret = TABLE.resolve(implementation, interpret, log_decay=log_decay)
    if impl == "xla":
        return xla_linear_attention(q, k, v, log_decay, initial_state, scale=scale,
                                    chunk=chunk_size)
    return blockspec_linear_attention(q, k, v, log_decay, initial_state, scale=scale,
                                      chunk=chunk_size, interpret=interpret)
