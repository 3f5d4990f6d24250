"""Public row gather with ``implementation=`` dispatch:
out[m] = sum_j weight[m, j] * src[index[m, j]] (reference.py is the spec).

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the reference: XLA's gather, fused with the sum;
  'blockspec'  the portable Pallas kernel of blockspec.py (compiled on a
               GPU, interpreted on CPU when asked); D a power of two, 16 to 8192;
  'pallas'     'blockspec' (the only Pallas kernel of this op);
  'auto'       the reference, on every machine, until the GPU benchmark
               (python -m pallas_kernels.row_gather.bench) shows the kernel
               faster at the models' shapes.
Differentiable in src and weight: src's gradient is the scatter-add of the
output's (XLA, whatever the implementation), weight's the per-row dot of
the output's gradient with each source row. Callers that know an inverse
map (jaxkit's MoE dispatch) write their own backward as another row gather.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.row_gather import reference
from pallas_kernels.row_gather.blockspec import blockspec_row_gather, unsupported

DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def _blockspec_problem(args):
    problem = unsupported(args.src.shape[1])
    if problem:
        return problem
    if args.index.shape[0] == 0:
        return f"takes at least one output row, got index of shape {args.index.shape}"
    return None


TABLE = dispatch.Table("row gather", {
    "xla": dispatch.takes_any,
    "blockspec": _blockspec_problem,
}, preference=("xla",))
IMPLEMENTATIONS = TABLE.names


def check_inputs(src, index, weight, out_dtype):
    if src.ndim != 2 or 0 in src.shape:
        raise ValueError(f"src must be [N, D] with N, D >= 1, got shape {src.shape}")
    if src.dtype not in DTYPES:
        raise ValueError(f"src must be float32, bfloat16 or float16, got {src.dtype}")
    if index.ndim not in (1, 2) or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be an int array [M] or [M, r], got {index.dtype} "
                         f"{index.shape}")
    if weight is not None:
        want = index.shape if index.ndim == 2 else (*index.shape, 1)
        if weight.shape != want or weight.dtype not in DTYPES:
            raise ValueError(f"weight must be a float array of shape {want} (index "
                             f"{index.shape}), got {weight.dtype} {weight.shape}")
    if jnp.dtype(out_dtype) not in DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def row_gather(src, index, weight=None, *, out_dtype=None, implementation: str = "auto",
               interpret: bool | None = None):
    """out [M, D] in out_dtype (None: src's): out[m] = sum over j of
    weight[m, j] * src[index[m, j]], summed in float32; see reference.py for
    the index rules (an entry outside [-N, N) selects a zero row). interpret
    (None: True off GPU) applies to the Pallas kernel only."""
    src = dispatch.as_array("src", src)
    index = dispatch.as_array("index", index, integer=True)
    weight = None if weight is None else dispatch.as_array("weight", weight)
    out_dtype = jnp.dtype(src.dtype if out_dtype is None else out_dtype)
    check_inputs(src, index, weight, out_dtype)
    impl, interpret = TABLE.resolve(implementation, interpret, src=src, index=index)
    index2 = index[:, None] if index.ndim == 1 else index
    if impl == "xla":
        return reference.row_gather(src, index2, weight, out_dtype)
    return _kernel_call(src, index2, weight, out_dtype, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_call(src, index, weight, out_dtype, interpret):
    return blockspec_row_gather(src, index, weight, out_dtype=out_dtype, interpret=interpret)


def _kernel_fwd(src, index, weight, out_dtype, interpret):
    return _kernel_call(src, index, weight, out_dtype, interpret), (src, index, weight)


def _kernel_bwd(out_dtype, interpret, res, g):
    src, index, weight = res
    _, pull = jax.vjp(lambda s, w: reference.row_gather(s, index, w, out_dtype), src, weight)
    d_src, d_weight = pull(g)
    return d_src, None, d_weight


_kernel_call.defvjp(_kernel_fwd, _kernel_bwd)
