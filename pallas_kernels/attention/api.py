"""Public attention entry point with ``implementation=`` dispatch.

implementation:
  'xla'    the pure-jnp reference (differentiated by XLA);
  'cudnn'  jax.nn.dot_product_attention's cuDNN path (GPU only);
  'pallas' the flash-attention Pallas kernel (Mosaic GPU on Hopper, the portable
           BlockSpec kernel elsewhere: compiled on other GPUs, interpreted on CPU);
  'auto'   the Pallas kernel on GPU, the reference on CPU.
An implementation that cannot honour an argument raises; none is ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.attention import mosaic_gpu
from pallas_kernels.attention.blockspec import PortableBlockSizes, blockspec_flash_attention
from pallas_kernels.attention.reference import attention_reference

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


def _normalize_segment_ids(segment_ids, q, k):
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if q.shape[1] != k.shape[1]:
            raise ValueError("a single segment_ids array needs q_len == kv_len; "
                             "pass (q_segment_ids, kv_segment_ids) instead")
        q_seg = kv_seg = segment_ids
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


def _cudnn(q, k, v, *, causal, segment_ids, sliding_window, logit_softcap, scale):
    if compat.platform() != "gpu":
        raise ValueError("implementation='cudnn' needs a GPU")
    if logit_softcap is not None:
        raise ValueError("implementation='cudnn' does not support logit_softcap")
    if segment_ids is not None:
        raise ValueError("implementation='cudnn' does not support segment_ids here")
    if sliding_window is not None and not causal:
        raise ValueError("implementation='cudnn' supports sliding_window only with causal=True")
    if q.dtype == jnp.float32:
        raise ValueError("implementation='cudnn' needs bfloat16 or float16 inputs")
    if q.shape[1] != k.shape[1] and causal:
        raise ValueError("implementation='cudnn' causal masks are top-left aligned; "
                         "use q_len == kv_len")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=window, implementation="cudnn")


def _pallas(q, k, v, *, block_sizes, interpret, **kwargs):
    if block_sizes is not None and not isinstance(block_sizes, PortableBlockSizes):
        raise ValueError(f"block_sizes must be a PortableBlockSizes, got {block_sizes!r}")
    if interpret is None:
        interpret = compat.platform() == "cpu"
    if not interpret and compat.platform() != "gpu":
        raise ValueError(f"compiled Pallas attention needs a GPU (backend is "
                         f"{compat.platform()!r}); pass interpret=True")
    # PortableBlockSizes tile the portable kernel; the Mosaic kernel chooses its own.
    if (not interpret and block_sizes is None and compat.is_hopper()
            and mosaic_gpu.supports(q=q, k=k, v=v, **kwargs) is None):
        return mosaic_gpu.mosaic_flash_attention(q, k, v, **kwargs)
    segment_ids = kwargs.pop("segment_ids")
    return blockspec_flash_attention(q, k, v, segment_ids, block_sizes=block_sizes,
                                     interpret=interpret, **kwargs)


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    scale: float | None = None, implementation: str = "auto",
                    block_sizes=None, interpret: bool | None = None):
    """Multi-head attention, q [B,S,H,D], k/v [B,T,KH,D] -> [B,S,H,D].

    segment_ids: int [B,S] (when S == T) or a pair ([B,S], [B,T]); tokens attend
    only within equal ids. sliding_window w: keys fewer than w positions away.
    logit_softcap c: logits become c*tanh(logits/c). scale defaults to D**-0.5.
    block_sizes (a blockspec.PortableBlockSizes) and interpret (None: True on CPU) apply
    to implementation='pallas' only; giving block_sizes selects the portable
    BlockSpec kernel even on Hopper.
    """
    check_inputs(q, k, v)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be > 0, got {logit_softcap}")
    segment_ids = _normalize_segment_ids(segment_ids, q, k)
    kwargs = dict(causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                  logit_softcap=logit_softcap, scale=scale)
    if implementation == "auto":
        implementation = "pallas" if compat.platform() == "gpu" else "xla"
    if implementation != "pallas" and (block_sizes is not None or interpret is not None):
        raise ValueError(f"block_sizes and interpret apply only to implementation='pallas', "
                         f"not {implementation!r}")
    if implementation == "xla":
        return attention_reference(q, k, v, **kwargs)
    if implementation == "cudnn":
        return _cudnn(q, k, v, **kwargs)
    return _pallas(q, k, v, block_sizes=block_sizes, interpret=interpret, **kwargs)
