"""The portable Pallas flash-attention kernel against the jnp reference.

Every kernel test compares the output and dq, dk, dv (through jax.vjp with a
random cotangent) with the reference, by relative error ||got - ref|| / ||ref||:
under 1e-5 for float32 inputs, under 2e-2 for 16-bit inputs (whose reference is
the float32 one on the same rounded inputs). Shapes are small and odd so the
interpreted kernel stays cheap on CPU; each test also runs compiled on a GPU.
"""
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kernel_modes

from pallas_kernels.attention import attention_reference_with_lse, flash_attention
from pallas_kernels.attention.blockspec import PortableBlockSizes, blockspec_attention_with_lse

F32_TOL = 1e-5
LOW_PRECISION_TOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    sliding_window: int | None = None
    logit_softcap: float | None = None
    scale: float | None = None
    segments: bool = False
    blocks: PortableBlockSizes = PortableBlockSizes(block_q=32, block_kv=32, block_q_bwd=32,
                                                    block_kv_bwd=32)

    def attention_kwargs(self):
        return dict(causal=self.causal, sliding_window=self.sliding_window,
                    logit_softcap=self.logit_softcap, scale=self.scale)


SMALL = PortableBlockSizes(block_q=16, block_kv=32, block_q_bwd=32, block_kv_bwd=16)

CASES = {
    "causal": Case(2, 64, 64, 2, 2, 32, causal=True, blocks=SMALL),
    "noncausal_odd_len": Case(1, 77, 77, 2, 2, 32),
    "causal_odd_len_and_head_dim": Case(1, 77, 77, 2, 2, 24, causal=True),
    "q_shorter_than_kv_gqa": Case(1, 40, 100, 4, 2, 32, causal=True),
    "q_longer_than_kv": Case(1, 72, 40, 2, 1, 16, causal=True),  # first rows see no key
    "mqa": Case(2, 50, 50, 4, 1, 32, causal=True, blocks=SMALL),
    "window_noncausal_d64": Case(1, 96, 96, 2, 2, 64, sliding_window=20),
    "window_causal": Case(1, 90, 90, 2, 1, 32, causal=True, sliding_window=17),
    "segments": Case(2, 64, 64, 2, 2, 32, causal=True, segments=True),
    "softcap_scale": Case(1, 48, 48, 2, 2, 32, logit_softcap=2.0, scale=0.4),
    "combined": Case(2, 70, 90, 4, 2, 32, causal=True, sliding_window=33, logit_softcap=5.0,
                     scale=0.3, segments=True, blocks=SMALL),
    "d128": Case(1, 48, 48, 1, 1, 128, causal=True),
}

LOW_PRECISION_CASES = {
    "bf16_causal_gqa": (jnp.bfloat16, Case(1, 77, 77, 4, 2, 32, causal=True)),
    "bf16_combined": (jnp.bfloat16, CASES["combined"]),
    "fp16_window": (jnp.float16, Case(1, 64, 64, 2, 1, 32, sliding_window=24)),
}


def _segment_ids(key, batch, length, num_segments):
    """Sorted random ids: packed sequences of random lengths."""
    return jnp.sort(jax.random.randint(key, (batch, length), 0, num_segments), axis=1)


def _inputs(case: Case, dtype, seed):
    kq, kk, kv, kc, ks1, ks2 = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(kq, (case.batch, case.q_len, case.heads, case.head_dim), dtype)
    k = jax.random.normal(kk, (case.batch, case.kv_len, case.kv_heads, case.head_dim), dtype)
    v = jax.random.normal(kv, (case.batch, case.kv_len, case.kv_heads, case.head_dim), dtype)
    cotangent = jax.random.normal(kc, q.shape, dtype)
    segments = None
    if case.segments:
        segments = (_segment_ids(ks1, case.batch, case.q_len, 3),
                    _segment_ids(ks2, case.batch, case.kv_len, 3))
    return q, k, v, cotangent, segments


def _out_and_grads(attention, q, k, v, segments, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segments), q, k, v)
    return (out, *vjp(cotangent))


def _pallas_fn(case: Case, interpret):
    def attention(q, k, v, segments):
        return flash_attention(q, k, v, segment_ids=segments, implementation="pallas",
                               block_sizes=case.blocks, interpret=interpret,
                               **case.attention_kwargs())
    return jax.jit(lambda *args: _out_and_grads(attention, *args))


def _reference_fn(case: Case):
    def attention(q, k, v, segments):
        return attention_reference_with_lse(q, k, v, segment_ids=segments,
                                            **case.attention_kwargs())[0]
    return jax.jit(lambda *args: _out_and_grads(attention, *args))


def _relative_error(got, want):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))


def _check(case: Case, dtype, tol, interpret, seed):
    q, k, v, cotangent, segments = _inputs(case, dtype, seed)
    got = _pallas_fn(case, interpret)(q, k, v, segments, cotangent)
    f32 = lambda x: x.astype(jnp.float32)
    want = _reference_fn(case)(f32(q), f32(k), f32(v), segments, f32(cotangent))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert bool(jnp.all(jnp.isfinite(g))), f"{name} has non-finite values"
        err = _relative_error(g, w)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("name", CASES)
def test_float32_matches_reference(name, interpret):
    _check(CASES[name], jnp.float32, F32_TOL, interpret, seed=zlib.crc32(name.encode()))


@pytest.mark.parametrize("interpret", kernel_modes())
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_matches_float32_reference(name, interpret):
    dtype, case = LOW_PRECISION_CASES[name]
    _check(case, dtype, LOW_PRECISION_TOL, interpret, seed=zlib.crc32(name.encode()))


@pytest.mark.parametrize("interpret", kernel_modes())
def test_fully_masked_rows_are_zero_without_nan(interpret):
    case = Case(2, 45, 60, 2, 1, 32, causal=False, segments=True)
    q, k, v, cotangent, _ = _inputs(case, jnp.float32, seed=11)
    kv_seg = _segment_ids(jax.random.PRNGKey(12), case.batch, case.kv_len, 2)
    # Ids 5 and 6 appear nowhere in kv_seg: those query rows see no key at all.
    q_seg = jnp.where(jnp.arange(case.q_len) % 4 == 0, 5 + jnp.arange(case.batch)[:, None],
                      _segment_ids(jax.random.PRNGKey(13), case.batch, case.q_len, 2))
    empty = jnp.arange(case.q_len) % 4 == 0
    segments = (q_seg, kv_seg)
    out, dq, dk, dv = _pallas_fn(case, interpret)(q, k, v, segments, cotangent)
    want = _reference_fn(case)(q, k, v, segments, cotangent)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert bool(jnp.all(jnp.isfinite(g))), f"{name} has non-finite values"
        assert _relative_error(g, w) < F32_TOL, name
    assert bool(jnp.all(out[:, empty] == 0)) and bool(jnp.all(dq[:, empty] == 0))
    assert bool(jnp.any(out[:, ~empty] != 0))


@pytest.mark.parametrize("interpret", kernel_modes())
def test_logsumexp_matches_reference(interpret):
    case = CASES["q_longer_than_kv"]  # includes rows with no visible key (lse = -inf)
    q, k, v, _, _ = _inputs(case, jnp.float32, seed=21)
    out, lse = blockspec_attention_with_lse(q, k, v, causal=True, block_sizes=case.blocks,
                                            interpret=interpret)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, causal=True)
    assert _relative_error(out, ref_out) < F32_TOL
    assert bool(jnp.all(jnp.isneginf(lse) == jnp.isneginf(ref_lse)))
    finite = jnp.isfinite(ref_lse)
    assert bool(jnp.any(~finite)) and bool(jnp.any(finite))
    assert float(jnp.max(jnp.abs(jnp.where(finite, lse - ref_lse, 0.0)))) < 1e-5


def _qkv(shape_q=(1, 8, 4, 16), shape_kv=(1, 8, 2, 16)):
    """Inputs for argument checks (numpy's generator: nothing to compile)."""
    rng = np.random.default_rng(3)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in (shape_q, shape_kv, shape_kv))


@pytest.mark.parametrize("shapes, match", [
    (((1, 8, 4), (1, 8, 2, 16)), r"\(1, 8, 4\)"),
    (((1, 8, 4, 16), (1, 8, 2, 32)), r"\(1, 8, 2, 32\)"),
    (((2, 8, 4, 16), (1, 8, 2, 16)), r"\(2, 8, 4, 16\)"),
    (((1, 8, 4, 16), (1, 8, 3, 16)), "kv heads \\(3\\)"),
])
def test_bad_shapes_raise(shapes, match):
    q, k, v = _qkv(*shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, implementation="pallas")


def test_bad_dtype_raises():
    q, k, v = (x.astype(jnp.int32) for x in _qkv())
    with pytest.raises(ValueError, match="int32"):
        flash_attention(q, k, v, implementation="pallas")


@pytest.mark.parametrize("window", [0, -3])
def test_sliding_window_below_one_raises(window):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"got {window}"):
        flash_attention(q, k, v, sliding_window=window, implementation="pallas")


@pytest.mark.parametrize("field, value", [("block_q", 48), ("block_kv", 8), ("block_kv_bwd", 0)])
def test_bad_block_sizes_raise(field, value):
    with pytest.raises(ValueError, match=f"{field} .* got {value}"):
        PortableBlockSizes(**{field: value})


def test_block_sizes_only_for_pallas():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'xla'"):
        flash_attention(q, k, v, implementation="xla", block_sizes=PortableBlockSizes())
