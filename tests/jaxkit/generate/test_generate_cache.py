"""KV cache slots (the ring rule), writes, the page allocator and memory
accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.generate.cache import KVCache, bytes_per_token, empty_caches, storage
from jaxkit.generate.pages import OutOfPages, PageAllocator, assign_pages
from pallas_kernels.decode_attention import QuantizedKV, dequantize_kv, kivi2_append
from pallas_kernels.decode_attention.reference import decode_attention_reference, logical_cache

H, D = 2, 4


def test_rows_follow_the_ring_and_store_each_slot_once():
    cache = empty_caches(1, (2, 5), H, D, "float32")[0]
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    valid = positions < jnp.array([[12], [3]])
    rows = np.asarray(cache.rows(positions, valid))
    dropped = 2 * 5
    # sequence 0 keeps its newest 5 positions, 7..11, in slots p % 5
    np.testing.assert_array_equal(rows[0], [dropped] * 7 + [2, 3, 4, 0, 1])
    np.testing.assert_array_equal(rows[1], [5, 6, 7] + [dropped] * 9)


def test_paged_rows_go_through_the_page_table():
    table = jnp.array([[3, 0], [1, 2]], jnp.int32)  # 2 pages of 4 slots each
    cache = empty_caches(1, (4, 4), H, D, "float32", table)[0]
    assert cache.capacity == 8
    positions = jnp.array([[2, 5, 9], [2, 4, 7]])
    rows = np.asarray(cache.rows(positions, jnp.array([[True, True, True], [True, False, True]])))
    # slot 2 -> page 3 row 14; slot 5 -> page 0 row 1; position 9 wraps to slot 1 -> row 13
    np.testing.assert_array_equal(rows, [[14, 1, 13], [6, 16, 11]])


@pytest.mark.parametrize("fmt, atol", [("float32", 0.0), ("bfloat16", 1e-2), ("int8", 2e-2),
                                       ("fp8", 0.15)])
@pytest.mark.parametrize("paged", [False, True])
def test_write_stores_values_where_decode_attention_reads_them(fmt, atol, paged):
    table = jnp.array([[2, 0], [1, 3]], jnp.int32) if paged else None
    cache = empty_caches(1, (4, 3) if paged else (2, 6), H, D, fmt, table)[0]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, H, D)), jnp.float32)
    positions = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]])  # sequence 1 wraps past slot 5
    cache = cache.write(x, -x, positions, jnp.ones((2, 4), bool))
    k, v = (logical_cache(t, table) for t in (cache.k, cache.v))
    as_float = (lambda t: dequantize_kv(t, jnp.float32)) if fmt in ("int8", "fp8") \
        else (lambda t: t.astype(jnp.float32))
    assert isinstance(cache.k, QuantizedKV) == (fmt in ("int8", "fp8"))
    k, v = as_float(k), as_float(v)
    np.testing.assert_allclose(k[0, :4], x[0], atol=atol)
    np.testing.assert_allclose(k[1, [4, 5, 0, 1]], x[1], atol=atol)
    np.testing.assert_allclose(v[1, [4, 5, 0, 1]], -x[1], atol=atol)
    assert not np.any(np.asarray(k[0, 4:])) and not np.any(np.asarray(k[1, 2:4]))


def test_inactive_sequences_write_nothing():
    cache = empty_caches(1, (2, 4), H, D, "float32")[0]
    x = jnp.ones((2, 1, H, D))
    cache = cache.write(x, x, jnp.array([[0], [0]]), jnp.array([[True], [False]]))
    assert np.all(np.asarray(cache.k[0, 0]) == 1) and not np.any(np.asarray(cache.k[1]))


def test_allocator_hands_out_each_page_once():
    allocator = PageAllocator(6)
    pages = assign_pages(allocator, [5, 30, 1], capacity=8, page_size=4)
    # 5 tokens: 2 pages; 30 tokens in a ring of 8 slots: 2 pages; 1 token: 1 page
    assert [len(p) for p in pages.pages] == [2, 2, 1]
    assert sorted(sum(pages.pages, [])) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(pages.table[:, 0], [p[0] for p in pages.pages])
    assert allocator.num_free == 1
    with pytest.raises(OutOfPages, match="asked for 2 pages, 1 of 6 free"):
        allocator.allocate(2)
    allocator.free(pages.pages[1])
    assert allocator.num_free == 3 and len(allocator.allocate(3)) == 3
    with pytest.raises(ValueError, match="not a multiple of page_size"):
        assign_pages(PageAllocator(4), [3], capacity=6, page_size=4)


def test_memory_per_token():
    assert storage("compute", jnp.bfloat16) == "bfloat16" and storage("fp32", jnp.bfloat16) == "float32"
    assert storage("int8", jnp.float32) == "int8"
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        storage("int4", jnp.float32)
    # 2 layers x (k and v) x 2 heads x 64 dims
    assert bytes_per_token("bfloat16", 2, 2, 64) == 2 * 2 * 2 * 64 * 2
    # one byte a value plus a float32 scale per token and head
    assert bytes_per_token("int8", 2, 2, 64) == bytes_per_token("fp8", 2, 2, 64) == 2 * 2 * 2 * 68
    cache = empty_caches(1, (3, 10), 2, 64, "int8")[0]
    assert isinstance(cache, KVCache) and cache.k.data.nbytes == 3 * 10 * 2 * 64


def test_kivi2_padded_batch_reads_as_each_sequence_alone():
    """A prefill of right-padded prompts and a decode step in which one
    sequence has finished leave every sequence's KIVI-2 cache (paged, each
    sequence's pages holding the padded prompt) reading by decode attention
    as if its own tokens alone had been appended."""
    # sequence 1 ends a group of 32: a write at its last position would quantize the group again
    lengths, active = np.array([5, 32, 1]), np.array([True, False, True])
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((3, 41, H, 16)), jnp.float32) for _ in range(2))
    table = jnp.array([[1, 4], [0, 3], [5, 2]], jnp.int32)
    cache = empty_caches(1, (6, 32), H, 16, "kivi2", table, residual_dtype=jnp.float32)[0]
    write = jax.jit(lambda c, k, v, p, m: c.write(k, v, p, m))
    attend = jax.jit(lambda q, c, n: decode_attention_reference(q, c.k, c.v, n,
                                                                page_table=c.page_table))
    positions = jnp.broadcast_to(jnp.arange(40), (3, 40))
    cache = write(cache, k[:, :40], v[:, :40], positions, positions < lengths[:, None])
    # as Transformer.decode feeds it: a finished sequence's token sits at its last position
    cache = write(cache, k[np.arange(3), lengths][:, None], v[np.arange(3), lengths][:, None],
                  jnp.asarray(np.where(active, lengths, lengths - 1))[:, None],
                  jnp.asarray(active)[:, None])
    final = jnp.asarray(lengths + active)
    q = jnp.asarray(rng.standard_normal((3, 1, 2 * H, 16)), jnp.float32)
    batch = attend(q, cache, final)
    for b in range(3):
        alone = empty_caches(1, (1, 64), H, 16, "kivi2", residual_dtype=jnp.float32)[0]
        n = int(final[b])
        keys, values = kivi2_append(alone.k, alone.v, k[b:b + 1, :n], v[b:b + 1, :n], [0])
        want = attend(q[b:b + 1], KVCache(keys, values), final[b:b + 1])
        np.testing.assert_allclose(batch[b], want[0], atol=1e-6, err_msg=f"sequence {b}")
