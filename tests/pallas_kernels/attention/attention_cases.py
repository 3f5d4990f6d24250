"""The one case table of attention that every implementation runs, and the
check they share.

test_attention.py runs the table through the reference
(implementation='xla') and the portable kernel, test_attention_mosaic.py
through the Mosaic GPU kernels, each on the cases its problem function
accepts (``problem``): the Mosaic kernels, for one, take 16-bit inputs and
head dims 64, 128 and 256 only. A run checks the output and dq, dk, dv
(through jax.vjp with a random cotangent) against softmax attention and its
gradients written out in float64 NumPy on the same rounded inputs
(``expected``), by relative error ||got - want|| / ||want||: under 1e-5 for
float32 inputs, under 2e-2 for 16-bit ones. Lengths are odd or unequal, so
every kernel pads and masks partial blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import tuning
from pallas_kernels.attention.blockspec import PortableBlockSizes
from pallas_kernels.attention.mask import visible
from pallas_kernels.attention.mosaic_gpu.vjp import argument_problem
from pallas_kernels.attention.tuning import KernelBlocks as KB

F32_TOL = 1e-5
LOW_PRECISION_TOL = 2e-2

TILES_32 = PortableBlockSizes(block_q=32, block_kv=32, block_q_bwd=32, block_kv_bwd=32)
SMALL = PortableBlockSizes(block_q=16, block_kv=32, block_q_bwd=32, block_kv_bwd=16)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: object = jnp.float32
    causal: bool = False
    sliding_window: int | None = None
    logit_softcap: float | None = None
    scale: float | None = None
    segments: int = 0  # packed sequences a row (sorted random ids); 0: no segment ids
    portable_blocks: PortableBlockSizes = TILES_32
    mosaic_blocks: tuning.MosaicBlockSizes | None = None  # None: the tuning table's
    # Too large for the CPU interpreter and the float64 reference on CPU: runs
    # compiled on the GPU only.
    compiled_only: bool = False

    def attention_kwargs(self):
        return dict(causal=self.causal, sliding_window=self.sliding_window,
                    logit_softcap=self.logit_softcap, scale=self.scale)

    @property
    def tolerance(self):
        return F32_TOL if self.dtype == jnp.float32 else LOW_PRECISION_TOL

    def shapes(self):
        """q, k, v, segment ids (None or a pair) and the cotangent, as shapes."""
        q = jax.ShapeDtypeStruct((self.batch, self.q_len, self.heads, self.head_dim), self.dtype)
        kv = jax.ShapeDtypeStruct((self.batch, self.kv_len, self.kv_heads, self.head_dim),
                                  self.dtype)
        ids = lambda length: jax.ShapeDtypeStruct((self.batch, length), jnp.int32)  # noqa: E731
        segments = (ids(self.q_len), ids(self.kv_len)) if self.segments else None
        return q, kv, kv, segments, q


def _mosaic(head_dim, **changes):
    return dataclasses.replace(tuning.DEFAULTS[head_dim], **changes)


BF16, F16 = jnp.bfloat16, jnp.float16
CASES = {
    # float32: the tight tolerance (the Mosaic kernels take 16-bit inputs only).
    "causal": Case(2, 64, 64, 2, 2, 32, causal=True, portable_blocks=SMALL),
    "noncausal_odd_len": Case(1, 77, 77, 2, 2, 32),
    "causal_odd_len_and_head_dim": Case(1, 77, 77, 2, 2, 24, causal=True),
    "q_shorter_than_kv_gqa": Case(1, 40, 100, 4, 2, 32, causal=True),
    "q_longer_than_kv": Case(1, 72, 40, 2, 1, 16, causal=True),  # first rows see no key
    "mqa": Case(2, 50, 50, 4, 1, 32, causal=True, portable_blocks=SMALL),
    "window_noncausal_d64": Case(1, 96, 96, 2, 2, 64, sliding_window=20),
    "window_causal": Case(1, 90, 90, 2, 1, 32, causal=True, sliding_window=17),
    "segments": Case(2, 64, 64, 2, 2, 32, causal=True, segments=3),
    "softcap_scale": Case(1, 48, 48, 2, 2, 32, logit_softcap=2.0, scale=0.4),
    "combined": Case(2, 70, 90, 4, 2, 32, causal=True, sliding_window=33, logit_softcap=5.0,
                     scale=0.3, segments=3, portable_blocks=SMALL),
    "d128": Case(1, 48, 48, 1, 1, 128, causal=True),
    # 16-bit at head_dim 64, 128 and 256: every implementation. Unequal lengths
    # draw q and kv segment ids separately, so some query rows see no key; a
    # small cap (2-3) bends most logits.
    "bf16_causal_gqa": Case(1, 77, 77, 4, 2, 64, BF16, causal=True),
    "bf16_combined": Case(2, 70, 90, 4, 2, 64, BF16, causal=True, sliding_window=33,
                          logit_softcap=5.0, scale=0.3, segments=3, portable_blocks=SMALL),
    "fp16_window": Case(1, 64, 64, 2, 1, 64, F16, sliding_window=24),
    "d128_gqa_causal": Case(2, 256, 256, 2, 1, 128, BF16, causal=True),
    "d128_window_cuts_segment_spans": Case(1, 260, 330, 2, 1, 128, BF16, causal=True,
                                           sliding_window=70, segments=3),
    # Each Mosaic backward plan, with GQA, unequal lengths, windows, soft-capping
    # and segment ids among its cases (the 16-bit cases above take the tuning
    # table's plan). Fused dQ: at head_dim 64 the consumers take alternate
    # steps' dQ tiles (128: column halves).
    "fused_d128_q_shorter": Case(1, 200, 330, 4, 1, 128, F16,
                                 mosaic_blocks=_mosaic(128, backward="fused")),
    "fused_d128_q_longer_window": Case(1, 330, 200, 2, 2, 128, BF16, causal=True,
                                       sliding_window=70,
                                       mosaic_blocks=_mosaic(128, backward="fused")),
    "fused_d128_softcap_segments": Case(1, 300, 300, 4, 2, 128, BF16, logit_softcap=2.5,
                                        segments=4, mosaic_blocks=_mosaic(128, backward="fused")),
    "fused_d64_q_longer_softcap_segments": Case(
        1, 330, 200, 2, 2, 64, BF16, causal=True, sliding_window=70, logit_softcap=2.5,
        segments=3, mosaic_blocks=_mosaic(64, backward="fused")),
    "fused_dv_pass_gqa_causal": Case(2, 300, 300, 4, 2, 128, BF16, causal=True,
                                     mosaic_blocks=_mosaic(128, backward="fused_dv_pass")),
    "fused_dv_pass_softcap_segments": Case(
        1, 200, 330, 4, 1, 128, F16, sliding_window=90, logit_softcap=2.5, segments=3,
        mosaic_blocks=_mosaic(128, backward="fused_dv_pass")),
    # Separate dQ and dK/dV kernels, with other block sizes and depths and the
    # forward without ping-pong.
    "two_kernels_deep_segments": Case(
        2, 300, 300, 4, 2, 128, BF16, causal=True, segments=3,
        mosaic_blocks=_mosaic(128, fwd=KB(64, 64, 3), dkv=KB(64, 64, 3), backward="two_kernels")),
    "two_kernels_xla_delta_window": Case(
        1, 250, 250, 2, 1, 128, F16, sliding_window=70,
        mosaic_blocks=_mosaic(128, pingpong=False, fwd=KB(64, 64, 3), dq=KB(64, 128, 2),
                              dkv=KB(64, 64, 3), backward="two_kernels_xla_delta")),
    "two_kernels_d64_wide_softcap": Case(
        1, 200, 330, 2, 2, 64, BF16, causal=True, sliding_window=60, logit_softcap=2.0,
        mosaic_blocks=_mosaic(64, pingpong=False, fwd=KB(64, 256, 2), dq=KB(64, 128, 2),
                              backward="two_kernels")),
    # head_dim 256's role-split dQ and dK/dV kernels, two stages and one.
    "role_split_q_shorter_gqa": Case(1, 200, 330, 4, 2, 256, F16),
    "role_split_one_stage_softcap": Case(
        1, 330, 200, 4, 1, 256, BF16, causal=True, sliding_window=70, logit_softcap=2.0,
        mosaic_blocks=_mosaic(256, dq=KB(64, 64, 1), dkv=KB(64, 64, 1))),
    "role_split_window_softcap_segments": Case(1, 190, 190, 2, 1, 256, BF16, causal=True,
                                               sliding_window=50, logit_softcap=3.0,
                                               segments=2),
    # Enough blocks for several groups in the Mosaic kernels' block order
    # (forward, dQ and dK/dV).
    "many_blocks": Case(4, 2000, 2000, 8, 4, 64, BF16, causal=True, compiled_only=True),
}


def problem(case, implementation, mode):
    """Why ``implementation`` ('xla', 'blockspec' or 'mosaic_gpu') run in
    ``mode`` ('compiled' on the GPU; 'interpret' or 'lower' on CPU; None: the
    default device) cannot take the case, or None. The Mosaic kernels' limits
    are those of their argument checks: the rest of their ``supports`` is the
    device, and on CPU their cases are lowered instead."""
    if case.compiled_only and mode != "compiled":
        return "too large to run on CPU: runs compiled on the GPU only"
    if implementation == "mosaic_gpu":
        q, k, v, segments, _ = case.shapes()
        return argument_problem(q, k, v, segments, case.sliding_window, case.logit_softcap)
    return None


def inputs(case, seed):
    """q, k, v (in the case's dtype), segment ids (None or a pair) and the
    cotangent of a case, drawn by numpy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    q, k, v, segments, cotangent = case.shapes()
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(x.shape, np.float32).astype(x.dtype))
                          for x in (q, k, v, cotangent))
    if segments:
        q_ids = segment_ids(rng, case.batch, case.q_len, case.segments)
        segments = (q_ids, q_ids if case.q_len == case.kv_len else
                    segment_ids(rng, case.batch, case.kv_len, case.segments))
    return q, k, v, segments, cotangent


@functools.lru_cache(maxsize=None)
def case_inputs(name):
    """inputs() of a case of the table, seeded by its name."""
    return inputs(CASES[name], zlib.crc32(name.encode()))


def segment_ids(rng, batch, length, num_segments):
    """Sorted random ids (numpy's generator rng): packed sequences of random
    lengths."""
    return jnp.asarray(np.sort(rng.integers(0, num_segments, (batch, length)), axis=1),
                       jnp.int32)


def out_and_grads(attention, q, k, v, segments, cotangent):
    """attention(q, k, v, segments) and its gradients for the cotangent."""
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segments), q, k, v)
    return (out, *vjp(cotangent))


def expected(case, q, k, v, segments, cotangent):
    """out, dq, dk, dv in float64 NumPy on the (rounded) inputs: softmax
    attention and its gradients written out, the mask from mask.visible."""
    S, H, T, KH = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    group = H // KH

    def by_head(x, repeat=1):
        """[B,L,heads,D] -> [B,H,L,D]; query head h reads kv head h // group."""
        return np.repeat(np.asarray(x, np.float64), repeat, axis=2).transpose(0, 2, 1, 3)
    q, do, k, v = by_head(q), by_head(cotangent), by_head(k, group), by_head(v, group)
    scale = q.shape[3] ** -0.5 if case.scale is None else case.scale
    logits = q @ k.swapaxes(2, 3) * scale
    d_logits = 1.0
    if case.logit_softcap is not None:
        tanh = np.tanh(logits / case.logit_softcap)
        logits, d_logits = case.logit_softcap * tanh, 1.0 - tanh ** 2
    seg = {}
    if segments is not None:
        seg = dict(q_segment=np.asarray(segments[0])[:, None, :, None],
                   k_segment=np.asarray(segments[1])[:, None, None, :])
    mask = np.asarray(visible(np.arange(S)[:, None] + (T - S), np.arange(T)[None, :],
                              causal=case.causal, sliding_window=case.sliding_window, **seg))
    logits = np.where(mask, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    p = np.where(mask, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = p.sum(-1, keepdims=True)
    p /= np.where(total == 0, 1.0, total)  # rows that see no key: all zero
    dp = do @ v.swapaxes(2, 3)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * d_logits * scale

    def query_layout(x):  # [B,H,S,D] -> [B,S,H,D]
        return x.transpose(0, 2, 1, 3)

    def kv_layout(x):  # [B,H,T,D] -> [B,T,KH,D], summed over each kv head's group
        B, _, T, D = x.shape
        return x.reshape(B, KH, group, T, D).sum(2).transpose(0, 2, 1, 3)
    return (query_layout(p @ v), query_layout(ds @ k), kv_layout(ds.swapaxes(2, 3) @ q),
            kv_layout(p.swapaxes(2, 3) @ do))


@functools.lru_cache(maxsize=None)
def _expected(name):
    return expected(CASES[name], *case_inputs(name))


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm((got - want).ravel()) / np.linalg.norm(want.ravel()))


def compare(case, got, want):
    """out, dq, dk, dv against ``expected``'s: in the inputs' dtype and shapes,
    finite, within the case's tolerance."""
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == case.dtype and g.shape == w.shape, what
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{what} has non-finite values"
        err = relative_error(g, w)
        assert err < case.tolerance, f"{what}: relative error {err:.2e} >= {case.tolerance:.0e}"


def check(name, attention):
    """attention(q, k, v, segments) on a case of the table, with its
    gradients, against ``expected``."""
    got = jax.jit(functools.partial(out_and_grads, attention))(*case_inputs(name))
    compare(CASES[name], got, _expected(name))
