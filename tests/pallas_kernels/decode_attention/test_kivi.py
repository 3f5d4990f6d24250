"""The KIVI-2 cache format (kv_formats): planar 2-bit packing, what
kivi2_append stores (groups quantized as they complete, against a NumPy
quantization of the same tokens; the residual; ring wrap-around; a paged
pool holding exactly what a contiguous cache does) and its memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention.kv_formats import (KIVI_PARAM_DTYPE, kivi2_append,
                                                        kivi2_cache, kivi2_dequantize,
                                                        kivi2_residual_bytes, kv_bytes_per_token,
                                                        pack2, unpack2)

APPEND = jax.jit(kivi2_append)


def test_planar_packing():
    codes = np.random.default_rng(0).integers(0, 4, (3, 32)).astype(np.uint8)
    packed = np.asarray(pack2(jnp.asarray(codes)))
    assert packed.shape == (3, 8) and packed.dtype == np.uint8
    for j in range(4):  # byte i, bits 2j and 2j+1: channel j * D/4 + i
        assert ((packed >> (2 * j)) & 3 == codes[:, j * 8:(j + 1) * 8]).all()
    assert (np.asarray(unpack2(jnp.asarray(packed))) == codes).all()


def _quantized(x, axis):
    """NumPy 2-bit asymmetric quantization (float16 scale and zero) -> values."""
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    scale = ((hi - lo) / 3).astype(np.float16).astype(np.float64)
    zero = lo.astype(np.float16).astype(np.float64)
    codes = np.clip(np.round((x - zero) / np.where(scale == 0, 1, scale)), 0, 3)
    return codes * scale + zero


def _build(lengths, C, G, Gv, hist, chunk):
    B, _, Hkv, D = hist["k"].shape
    caches = []
    for b, L in enumerate(lengths):
        cache = kivi2_cache((1, C, Hkv, D), 1, group=G, value_group=Gv)
        for start in range(0, L, chunk):
            stop = min(L, start + chunk)
            cache = APPEND(*cache, hist["k"][b:b + 1, start:stop], hist["v"][b:b + 1, start:stop],
                           jnp.array([start]))
        caches.append(cache)
    return [jax.tree.map(lambda *a: jnp.concatenate(a), *[c[i] for c in caches]) for i in (0, 1)]


def test_append_quantizes_complete_groups_and_keeps_the_rest():
    """Lengths 0..3 groups, a partial group and a ring wrapped twice: every
    position older than the filling group sits in slot p mod C as the
    NumPy quantization of its group gives it (of the tokens as the bf16
    residual held them); the filling group's tokens sit in the residual at
    row p mod G."""
    rng = np.random.default_rng(1)
    C, G, Gv, Hkv, D = 32, 8, 16, 2, 64
    lengths = (0, 8, 21, 77)
    hist = {w: rng.standard_normal((4, 80, Hkv, D)).astype(np.float32) for w in "kv"}
    keys, values = _build(lengths, C, G, Gv, hist, chunk=5)  # appends of 5 tokens, and 1-3
    assert keys.scale.dtype == KIVI_PARAM_DTYPE and keys.scale.shape == (4, C // G, Hkv, D)
    assert values.scale.shape == (4, C, Hkv, D // Gv)
    k_slots, v_slots = (np.asarray(kivi2_dequantize(x), np.float64) for x in (keys, values))
    held = {w: np.asarray(jnp.asarray(h, jnp.bfloat16), np.float64) for w, h in hist.items()}
    for b, L in enumerate(lengths):
        base = L - L % G
        for g0 in range(max(0, base - C), base, G):  # complete groups still in the ring
            want_k = _quantized(held["k"][b, g0:g0 + G], axis=0)
            v = held["v"][b, g0:g0 + G].reshape(G, Hkv, D // Gv, Gv)
            want_v = _quantized(v, axis=-1).reshape(G, Hkv, D)
            slots = np.arange(g0, g0 + G) % C
            np.testing.assert_allclose(k_slots[b, slots], want_k, atol=1e-5)
            np.testing.assert_allclose(v_slots[b, slots], want_v, atol=1e-5)
        for p in range(base, L):
            for x, w in ((keys, "k"), (values, "v")):
                np.testing.assert_array_equal(np.asarray(x.residual[b, p % G], np.float64),
                                              held[w][b, p])


def test_paged_append_stores_what_a_contiguous_cache_does():
    """The same tokens appended through a shuffled page table land, page by
    page, where the contiguous cache has them; other pages are untouched."""
    rng = np.random.default_rng(3)
    B, C, G, Gv, Hkv, D, page = 2, 32, 8, 16, 1, 64, 16
    hist = {w: jnp.asarray(rng.standard_normal((B, 45, Hkv, D)), jnp.float32) for w in "kv"}
    table = jnp.asarray(rng.permutation(5)[:4].reshape(B, 2), jnp.int32)
    flat = kivi2_cache((B, C, Hkv, D), B, group=G, value_group=Gv)
    pool = kivi2_cache((5, page, Hkv, D), B, group=G, value_group=Gv)
    for start in range(0, 45, 9):
        new = (hist["k"][:, start:start + 9], hist["v"][:, start:start + 9])
        flat = APPEND(*flat, *new, jnp.full((B,), start))
        pool = APPEND(*pool, *new, jnp.full((B,), start), table)
    spare = sorted(set(range(5)) - set(np.asarray(table).ravel().tolist()))
    for f, p in zip(flat, pool):
        for leaf_f, leaf_p in zip(f[:3], p[:3]):
            rows = leaf_p.shape[1]
            for b in range(B):
                for j in range(2):
                    np.testing.assert_array_equal(leaf_p[table[b, j]],
                                                  leaf_f[b, j * rows:(j + 1) * rows])
            assert not np.asarray(leaf_p[spare[0]]).any()
        np.testing.assert_array_equal(f.residual, p.residual)


def test_memory_per_token():
    # Per kv head and token: 2 x 32 bytes of codes, float16 scale and zero
    # per channel per 32 tokens (keys) and per 32 channels (values).
    assert kv_bytes_per_token("kivi2", 8, 128) == 8 * (64 + 16 + 16)
    assert kv_bytes_per_token("kivi2", 8, 128, group=64, value_group=64) == 8 * (64 + 8 + 8)
    assert kivi2_residual_bytes(8, 128) == 2 * 32 * 8 * 128 * 2
    with pytest.raises(ValueError, match="group=24 dividing S=64"):
        kivi2_cache((1, 64, 2, 128), 1, group=24)
