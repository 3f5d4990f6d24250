"""Public attention entry point with ``implementation=`` dispatch.

implementation (the shared rule of pallas_kernels.dispatch):
  'xla'        the pure-jnp reference (differentiated by XLA);
  'cudnn'      jax.nn.dot_product_attention's cuDNN path (GPU only);
  'mosaic_gpu' the Hopper flash-attention kernels of mosaic_gpu/ (bf16/f16,
               head_dim 64, 128 or 256; compiled only);
  'blockspec'  the portable BlockSpec kernel of blockspec.py (compiled on a
               GPU, interpreted on CPU);
  'pallas'     'mosaic_gpu' where it takes the call, else 'blockspec';
  'auto'       'pallas' on GPU, the reference on CPU.
An implementation that cannot honour an argument raises; none is ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.attention import mosaic_gpu
from pallas_kernels.attention.blockspec import PortableBlockSizes, blockspec_flash_attention
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.tuning import MosaicBlockSizes


def _normalize_segment_ids(segment_ids, q, k):
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise TypeError(f"segment_ids must be an int array or a pair (q_segment_ids, "
                            f"kv_segment_ids); got a {type(segment_ids).__name__} of "
                            f"{len(segment_ids)}")
        q_seg = dispatch.as_array("segment_ids[0]", segment_ids[0], integer=True)
        kv_seg = dispatch.as_array("segment_ids[1]", segment_ids[1], integer=True)
    else:
        if q.shape[1] != k.shape[1]:
            raise ValueError("a single segment_ids array needs q_len == kv_len; "
                             "pass (q_segment_ids, kv_segment_ids) instead")
        q_seg = kv_seg = dispatch.as_array("segment_ids", segment_ids, integer=True)
    if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
        raise ValueError(f"segment ids shapes {q_seg.shape}, {kv_seg.shape} must be "
                         f"[batch, q_len] {q.shape[:2]} and [batch, kv_len] {k.shape[:2]}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def check_inputs(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, len, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim of q {q.shape} and k {k.shape} differ")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide q heads ({q.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"unsupported dtype {q.dtype}; use float32, bfloat16 or float16")


def _check_block_sizes(block_sizes):
    """Every tile and stage count of block_sizes an int >= 1 (the classes'
    own checks take an integral float such as 64.0)."""
    if isinstance(block_sizes, MosaicBlockSizes):
        counts = {f"block_sizes.{kernel}.{field}": getattr(getattr(block_sizes, kernel), field)
                  for kernel in ("fwd", "dq", "dkv") for field in ("block_q", "block_kv", "stages")}
    elif isinstance(block_sizes, PortableBlockSizes):
        counts = {"block_sizes.num_stages": block_sizes.num_stages}
    else:
        raise ValueError(f"block_sizes must be a PortableBlockSizes or a MosaicBlockSizes, got "
                         f"{block_sizes!r}")
    for name, count in counts.items():
        dispatch.check_size(name, count)


def _takes_no_block_sizes(args):
    if args.block_sizes is not None:
        return f"takes no block_sizes ({args.block_sizes!r} tiles a Pallas kernel)"
    return None


def _cudnn_problem(args):
    if args.logit_softcap is not None:
        return "does not support logit_softcap"
    if args.segment_ids is not None:
        return "does not support segment_ids here"
    if args.sliding_window is not None and not args.causal:
        return "supports sliding_window only with causal=True"
    if args.q.dtype == jnp.float32:
        return "needs bfloat16 or float16 inputs"
    if args.q.shape[1] != args.k.shape[1] and args.causal:
        return "causal masks are top-left aligned; use q_len == kv_len"
    return _takes_no_block_sizes(args)


def _mosaic_problem(args):
    if isinstance(args.block_sizes, PortableBlockSizes):
        return "block_sizes is a PortableBlockSizes, which tiles the portable kernel"
    return mosaic_gpu.supports(args.q, args.k, args.v, segment_ids=args.segment_ids,
                               sliding_window=args.sliding_window,
                               logit_softcap=args.logit_softcap)


def _blockspec_problem(args):
    if isinstance(args.block_sizes, MosaicBlockSizes):
        return "block_sizes is a MosaicBlockSizes, which tiles the Mosaic GPU kernel"
    return None


# Jitted per static configuration: jax lowers a jitted callee once per module,
# so a model's layers share one lowering of the Mosaic kernels (and XLA one
# compilation of each) instead of one per layer.
_mosaic_attention = jax.jit(mosaic_gpu.mosaic_flash_attention, static_argnames=(
    "causal", "sliding_window", "logit_softcap", "scale", "block_sizes"))

TABLE = dispatch.Table("attention", {
    "xla": _takes_no_block_sizes,
    "cudnn": _cudnn_problem,
    "mosaic_gpu": _mosaic_problem,
    "blockspec": _blockspec_problem,
}, preference=("pallas", "xla"))
IMPLEMENTATIONS = TABLE.names


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    scale: float | None = None, implementation: str = "auto",
                    block_sizes=None, interpret: bool | None = None):
    """Multi-head attention, q [B,S,H,D], k/v [B,T,KH,D] -> [B,S,H,D].

    q, k, v and segment ids are jax or NumPy arrays (Python lists are refused).
    segment_ids: int [B,S] (when S == T) or a pair ([B,S], [B,T]); tokens attend
    only within equal ids (float or bool ids are refused). sliding_window w (an
    int >= 1): keys fewer than w positions away. logit_softcap c (a finite
    float > 0): logits become c*tanh(logits/c). scale (a finite float > 0)
    defaults to D**-0.5. causal is a bool.
    block_sizes tile a Pallas kernel: a blockspec.PortableBlockSizes the
    portable one (so 'pallas' takes it even on Hopper), a
    tuning.MosaicBlockSizes the Mosaic GPU one (overriding the tuning table).
    interpret (None: True off GPU) applies to the Pallas kernels only.
    """
    q, k, v = (dispatch.as_array(name, a) for name, a in (("q", q), ("k", k), ("v", v)))
    check_inputs(q, k, v)
    causal = dispatch.check_flag("causal", causal)
    if block_sizes is not None:
        _check_block_sizes(block_sizes)
    if sliding_window is not None:
        sliding_window = dispatch.check_size("sliding_window", sliding_window)
    if logit_softcap is not None:
        logit_softcap = dispatch.check_positive_real("logit_softcap", logit_softcap)
    if scale is not None:
        scale = dispatch.check_positive_real("scale", scale)
    segment_ids = _normalize_segment_ids(segment_ids, q, k)
    kwargs = dict(causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                  logit_softcap=logit_softcap, scale=scale)
    impl, interpret = TABLE.resolve(implementation, interpret, q=q, k=k, v=v,
                                    block_sizes=block_sizes, **kwargs)
    if impl == "xla":
        return attention_reference(q, k, v, **kwargs)
    if impl == "cudnn":
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            local_window_size=window, implementation="cudnn")
    if impl == "mosaic_gpu":
        return _mosaic_attention(q, k, v, block_sizes=block_sizes, **kwargs)
    segment_ids = kwargs.pop("segment_ids")
    return blockspec_flash_attention(q, k, v, segment_ids, block_sizes=block_sizes,
                                     interpret=interpret, **kwargs)
