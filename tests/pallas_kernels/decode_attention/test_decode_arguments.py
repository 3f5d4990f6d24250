"""decode_attention refuses a bad argument with a one-line TypeError or
ValueError naming it and its value, before anything is traced (the shared
rule of pallas_kernels.dispatch); the KV formats' own checks; and the block
ranges every kernel visits (positions.visible_blocks) against the mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import QuantizedKV, decode_attention, quantize_kv
from pallas_kernels.decode_attention.kv_formats import kivi2_cache, kv_bytes_per_token
from pallas_kernels.decode_attention.positions import (query_position, slot_position, visible,
                                                       visible_blocks)

Q = jnp.ones((2, 1, 4, 16), jnp.float32)
K = jnp.ones((2, 8, 2, 16), jnp.float32)
LENGTHS = jnp.array([3, 8], jnp.int32)


def _call(q=Q, k=K, v=K, lengths=LENGTHS, **kw):
    return decode_attention(q, k, v, lengths, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q=[[1.0]]), TypeError, "q must be a jax or NumPy array, got list"),
    (dict(q=Q.astype(jnp.int32)), TypeError, "q must be float32, bfloat16 or float16, got int32"),
    (dict(q=Q[0]), ValueError, r"q must be \[B, T, Hq, D\].*\(1, 4, 16\)"),
    (dict(k=K[:, :, :, :8], v=K[:, :, :, :8]), ValueError, r"head_dim of k \(2, 8, 2, 8\)"),
    (dict(v=K[:, :7]), ValueError, r"k and v shapes differ: \(2, 8, 2, 16\) vs \(2, 7, 2, 16\)"),
    (dict(k=jnp.ones((2, 8, 3, 16)), v=jnp.ones((2, 8, 3, 16))), ValueError,
     r"kv heads \(3\) must divide q heads \(4\)"),
    (dict(k=K.astype(jnp.int8)), TypeError, "k must be float32, bfloat16, float16 or a "
                                            "QuantizedKV, got int8"),
    (dict(lengths=LENGTHS.astype(jnp.float32)), TypeError,
     "lengths must have an integer dtype, got float32"),
    (dict(lengths=LENGTHS[:1]), ValueError, r"lengths must be \[B\] = \(2,\), got shape \(1,\)"),
    (dict(k=K[:1], v=K[:1]), ValueError, r"a contiguous cache k \(1, 8, 2, 16\) needs batch 2"),
    (dict(q=jnp.ones((2, 9, 4, 16))), ValueError, "T=9 new tokens, more than the cache capacity 8"),
    (dict(page_table=jnp.zeros((2, 2))), TypeError, "page_table must have an integer dtype"),
    (dict(page_table=jnp.zeros((3, 2), jnp.int32)), ValueError,
     r"page_table must be \[B, pages_per_seq\] with B = 2, got shape \(3, 2\)"),
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1, got 0"),
    (dict(sliding_window=2.0), TypeError, "sliding_window must be an int, got 2.0"),
    (dict(sliding_window=True), TypeError, "sliding_window must be an int, got True"),
    (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be finite and > 0, got -1.0"),
    (dict(logit_softcap=float("nan")), ValueError, "logit_softcap must be finite"),
    (dict(scale=0), ValueError, "scale must be finite and > 0, got 0"),
    (dict(block_kv=0), ValueError, "block_kv must be >= 1, got 0"),
    (dict(num_splits=1.5), TypeError, "num_splits must be an int, got 1.5"),
    (dict(implementation="triton"), ValueError, "unknown decode attention implementation "
                                                "'triton'"),
    (dict(implementation="xla", block_kv=16), ValueError,
     "implementation='xla' cannot run this decode attention: takes no block_kv=16"),
    (dict(implementation="xla", interpret=True), ValueError, "takes no interpret"),
    (dict(implementation="blockspec", block_kv=48, interpret=True), ValueError,
     "block_kv=48 must be a power of two >= 16"),
    (dict(implementation="blockspec", interpret="yes"), TypeError,
     "interpret must be a bool or None, got 'yes'"),
])
def test_bad_arguments_raise_one_line(kwargs, error, match):
    with pytest.raises(error, match=match) as err:
        _call(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k,error,match", [
    (QuantizedKV(K, jnp.ones((2, 8, 2))), TypeError,
     "k.data must be int8 or float8_e4m3fn, got float32"),
    (QuantizedKV(K.astype(jnp.int8), jnp.ones((2, 8, 2), jnp.bfloat16)), TypeError,
     "k.scale must be float32, got bfloat16"),
    (QuantizedKV(K.astype(jnp.int8), jnp.ones((2, 8))), ValueError,
     r"k must be QuantizedKV\(data \[N, S, Hkv, D\], scale \[N, S, Hkv\]\), got data "
     r"\(2, 8, 2, 16\), scale \(2, 8\)"),
    (QuantizedKV([[1]], jnp.ones((2, 8, 2))), TypeError, "k.data must be a jax or NumPy array"),
])
def test_bad_quantized_caches_raise(k, error, match):
    with pytest.raises(error, match=match):
        _call(k=k)


def test_bad_kivi_caches_raise():
    keys, values = kivi2_cache((2, 8, 2, 16), 2, group=8, value_group=4)
    with pytest.raises(TypeError, match=r"KIVI-2 caches come in pairs \(Kivi2Keys k, "
                                        r"Kivi2Values v\); got k Kivi2Keys, v an array"):
        _call(k=keys)
    with pytest.raises(TypeError, match="v must be a Kivi2Values for KIVI-2, got Kivi2Keys"):
        _call(k=keys, v=keys)
    with pytest.raises(TypeError, match=r"k.codes must be uint8 \[N, S, Hkv, D/4\], got int8"):
        _call(k=keys._replace(codes=keys.codes.astype(jnp.int8)), v=values)
    with pytest.raises(ValueError, match=r"k.residual must be \[B, G, Hkv, D\] = \[B, G, 2, "
                                         r"16\] with G dividing S=8, got \(2, 3, 2, 16\)"):
        _call(k=keys._replace(residual=jnp.zeros((2, 3, 2, 16))), v=values)
    with pytest.raises(ValueError, match=r"v.scale must be float16 \[2, 8, 2, ...\], got float32"):
        _call(k=keys, v=values._replace(scale=values.scale.astype(jnp.float32)))
    with pytest.raises(ValueError, match="block_kv=16: KIVI-2 caches are walked by key group"):
        _call(k=keys, v=values, implementation="blockspec", interpret=True, block_kv=16)
    with pytest.raises(ValueError, match="KIVI-2 group=8 must be a power of two >= 16"):
        _call(k=keys, v=values, implementation="blockspec", interpret=True)


def test_paged_tiles_refused_by_the_portable_kernel():
    pool = jnp.ones((4, 4, 2, 16))
    with pytest.raises(ValueError, match="block_kv=16 applies to a contiguous cache"):
        _call(k=pool, v=pool, page_table=jnp.zeros((2, 2), jnp.int32), block_kv=16,
              implementation="blockspec", interpret=True)


def test_quantize_kv_checks_its_arguments():
    with pytest.raises(ValueError, match="fmt must be one of \\('int8', 'fp8'\\), got 'int4'"):
        quantize_kv(K, "int4")
    with pytest.raises(ValueError, match="x must be a float array"):
        quantize_kv(K.astype(jnp.int32), "int8")


def test_quantize_kv_is_absmax_per_token_and_head():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 2, 16)), jnp.float32).at[0, 0, 0].set(0.0)
    for fmt, top, err in (("int8", 127, 0.5 / 127), ("fp8", 448, 2.0 ** -4)):
        q = quantize_kv(x, fmt)
        assert q.fmt == fmt and q.shape == x.shape and q.scale.shape == x.shape[:3]
        np.testing.assert_allclose(q.scale, np.abs(x).max(-1) / top, rtol=1e-6)
        assert float(jnp.abs(q.data.astype(jnp.float32)).max()) == top
        assert bool(jnp.all(q.data[0, 0, 0].astype(jnp.float32) == 0))  # zero vector: zero codes
        back = q.data.astype(jnp.float32) * q.scale[..., None]
        # Rounding error: half a code step (int8), a relative 2^-4 (e4m3) of the absmax.
        top_x = jnp.abs(x).max(-1, keepdims=True)
        assert float(jnp.max(jnp.abs(back - x) / jnp.where(top_x == 0, 1.0, top_x))) <= err


def test_bytes_per_token():
    assert kv_bytes_per_token("bf16", 8, 128) == 2 * 8 * 128 * 2
    assert kv_bytes_per_token("float32", 1, 64) == 2 * 64 * 4
    assert kv_bytes_per_token("int8", 8, 128) == kv_bytes_per_token("fp8", 8, 128) == 2 * 8 * 132
    with pytest.raises(ValueError, match="unknown KV format 'int3'"):
        kv_bytes_per_token("int3", 8, 128)


@pytest.mark.parametrize("C,block,T", [(20, 4, 1), (20, 8, 3), (37, 16, 1), (48, 16, 3),
                                       (7, 16, 1)])
def test_visible_blocks_are_exactly_those_with_a_visible_slot(C, block, T):
    """Every length up to three wraps of the ring, windows and split ranges:
    the two ranges list each block holding a slot some query sees, once."""
    n_blocks = -(-C // block)
    lengths = np.arange(0, 3 * C + 2)
    splits = [(0, n_blocks), (0, 1), (1, n_blocks), (n_blocks // 2, n_blocks)]
    slots = jnp.arange(C, dtype=jnp.int32)
    for window in (None, 1, 3, 12):
        if window is not None and C < window + T - 1:
            continue
        k_pos = slot_position(jnp.asarray(lengths)[:, None], slots[None], C)
        q_pos = query_position(jnp.asarray(lengths)[:, None], jnp.arange(T)[None], T)
        seen = np.asarray(visible(q_pos[:, :, None], k_pos[:, None, :], window)).any(1)
        ranges = jax.jit(jax.vmap(jax.vmap(
            lambda L, lo, hi: jnp.stack(visible_blocks(L, C, T, window, block, lo, hi)),
            in_axes=(None, 0, 0)), in_axes=(0, None, None)))(
            jnp.asarray(lengths, jnp.int32), *(jnp.asarray(x, jnp.int32) for x in zip(*splits)))
        for L, per_split in zip(lengths, np.asarray(ranges)):
            for (lo, hi), (a, b, a2, b2) in zip(splits, per_split):
                got = list(range(a, b)) + list(range(a2, b2))
                want = [j for j in range(lo, hi) if seen[L, j * block:(j + 1) * block].any()]
                assert sorted(got) == want and len(set(got)) == len(got), (L, window, lo, hi)
