"""Public block-sparse attention entry point with ``implementation=`` dispatch.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the pure-jnp reference (reference.py; differentiated by XLA;
               builds the dense [Sq, Sk] mask, so for tests and small shapes);
  'mosaic_gpu' the Hopper kernels: the forward of mosaic_gpu.py and the
               fused dK/dV/dQ backward of mosaic_gpu_backward.py (bf16/f16,
               head_dim 64 or 128, block_k 64 or 128; compiled only);
  'blockspec'  the portable kernels of blockspec.py (compiled on a GPU,
               interpreted on CPU; block sizes powers of two >= 16);
  'pallas'     'mosaic_gpu' where it takes the call, else 'blockspec'
               (the Hopper backward while mosaic_gpu.BACKWARD_VERIFIED,
               which its compiled tests on a GPU set);
  'auto'       'pallas' on GPU, the reference on CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels.attention.api import _normalize_segment_ids, check_inputs
from pallas_kernels.block_sparse_attention import blockspec, mosaic_gpu
from pallas_kernels.block_sparse_attention.lists import canonical_lists
from pallas_kernels.block_sparse_attention.reference import block_sparse_attention_reference
from pallas_kernels.shapes import cdiv


def _mosaic_problem(args):
    return mosaic_gpu.supports(args.q, args.k, args.v, block_q=args.block_q,
                               block_k=args.block_k, list_heads=args.list_heads)


def _blockspec_problem(args):
    return blockspec.unsupported(args.q, args.block_q, args.block_k)


TABLE = dispatch.Table("block-sparse attention", {
    "xla": dispatch.takes_any,
    "mosaic_gpu": _mosaic_problem,
    "blockspec": _blockspec_problem,
}, preference=("pallas", "xla"))
IMPLEMENTATIONS = TABLE.names


def check_lists(block_indices, block_counts, *, batch, q_heads, kv_heads, num_q_blocks,
                num_kv_blocks):
    """The lists as int32 arrays. Shapes always, values where concrete:
    counts in [0, max_blocks], listed indices in [0, nK). Traced lists are
    taken as they come (lists.canonical_lists drops what is out of range)."""
    idx = dispatch.as_array("block_indices", block_indices, integer=True)
    cnt = dispatch.as_array("block_counts", block_counts, integer=True)
    if idx.ndim != 4 or idx.shape[3] < 1:
        raise ValueError(f"block_indices must be [B, H, nQ, max_blocks] with max_blocks >= 1, "
                         f"got shape {idx.shape}")
    want = (batch, idx.shape[1], num_q_blocks)
    if idx.shape[0] != batch or idx.shape[1] not in (q_heads, kv_heads) \
            or idx.shape[2] != num_q_blocks:
        raise ValueError(f"block_indices shape {idx.shape} must be [B={batch}, H, "
                         f"nQ={num_q_blocks}, max_blocks] with H = {q_heads} (query heads) or "
                         f"{kv_heads} (kv heads)")
    if cnt.shape != want:
        raise ValueError(f"block_counts shape {cnt.shape} must be {want} (block_indices' "
                         f"[B, H, nQ])")
    if not isinstance(cnt, jax.core.Tracer) and cnt.size:
        counts = np.asarray(cnt)
        if counts.min() < 0 or counts.max() > idx.shape[3]:
            bad = int(counts.min() if counts.min() < 0 else counts.max())
            raise ValueError(f"block_counts must lie in [0, max_blocks={idx.shape[3]}], "
                             f"got {bad}")
        if not isinstance(idx, jax.core.Tracer):
            indices = np.asarray(idx)
            listed = np.arange(idx.shape[3]) < counts[..., None]
            bad = listed & ((indices < 0) | (indices >= num_kv_blocks))
            if bad.any():
                raise ValueError(f"block_indices must lie in [0, nK={num_kv_blocks}) where "
                                 f"listed, got {int(indices[bad][0])} at "
                                 f"{tuple(int(x) for x in np.argwhere(bad)[0])}")
    return idx.astype(jnp.int32), cnt.astype(jnp.int32)


def block_sparse_attention(q, k, v, block_indices, block_counts, *, block_q: int, block_k: int,
                           causal: bool = False, segment_ids=None,
                           softmax_scale: float | None = None, implementation: str = "auto",
                           interpret: bool | None = None):
    """Attention of each query block to its listed key blocks only.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (Hkv divides Hq; float32, bfloat16
    or float16, all alike) -> out [B, Sq, Hq, D] in q's dtype, float32
    accumulation. Query block i is rows [i*block_q, (i+1)*block_q), key block
    j keys [j*block_k, (j+1)*block_k); the last blocks may be partial.

    block_indices int32 [B, H, nQ, max_blocks] (nQ = ceil(Sq / block_q)):
    the key blocks query block i visits are block_indices[b, h, i, :n] with
    n = block_counts[b, h, i] (int32 [B, H, nQ]); entries past n are ignored.
    H = Hq gives each query head its own lists; H = Hkv one list per kv head,
    shared by its query heads. Order does not matter and a repeated block
    counts once. Concrete lists are checked (counts in [0, max_blocks],
    listed indices in [0, nK)); traced ones are not, and a listed index
    outside [0, nK) selects nothing.

    Inside the listed blocks the mask of flash_attention applies: causal
    (bottom-right aligned when Sq != Sk) and segment_ids (int [B, Sq] when
    Sq == Sk, or a pair ([B, Sq], [B, Sk])). A query row that sees no key
    gets output 0 and zero gradients. softmax_scale defaults to D**-0.5.
    Differentiable in q, k, v (the integer inputs get no gradient).
    interpret (None: True off GPU) applies to the Pallas kernels only.
    """
    q, k, v = (dispatch.as_array(name, a) for name, a in (("q", q), ("k", k), ("v", v)))
    check_inputs(q, k, v)
    block_q = dispatch.check_size("block_q", block_q)
    block_k = dispatch.check_size("block_k", block_k)
    causal = dispatch.check_flag("causal", causal)
    if softmax_scale is not None:
        softmax_scale = dispatch.check_positive_real("softmax_scale", softmax_scale)
    B, S, H, _ = q.shape
    T, KH = k.shape[1], k.shape[2]
    idx, cnt = check_lists(block_indices, block_counts, batch=B, q_heads=H, kv_heads=KH,
                           num_q_blocks=cdiv(S, block_q), num_kv_blocks=cdiv(T, block_k))
    segment_ids = _normalize_segment_ids(segment_ids, q, k)
    impl, interpret = TABLE.resolve(implementation, interpret, q=q, k=k, v=v, block_q=block_q,
                                    block_k=block_k, list_heads=idx.shape[1])
    kwargs = dict(block_q=block_q, block_k=block_k, causal=causal, softmax_scale=softmax_scale)
    if impl == "xla":
        return block_sparse_attention_reference(q, k, v, idx, cnt, segment_ids=segment_ids,
                                                **kwargs)
    idx, cnt = canonical_lists(idx, cnt, cdiv(T, block_k))
    if impl == "mosaic_gpu":
        hopper_backward = mosaic_gpu.BACKWARD_VERIFIED or implementation == "mosaic_gpu"
        return mosaic_gpu.mosaic_block_sparse_attention(q, k, v, idx, cnt, segment_ids,
                                                        hopper_backward=hopper_backward,
                                                        **kwargs)
    return blockspec.blockspec_block_sparse_attention(q, k, v, idx, cnt, segment_ids,
                                                      interpret=interpret, **kwargs)
