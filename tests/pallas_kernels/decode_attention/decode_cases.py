"""The one case table of decode attention that every implementation runs,
and the check they share.

A case builds each sequence's token history (positions 0..L-1 of keys and
values), writes it into a cache by the ring rule (position p in logical slot
p % C, the newest position winning), contiguous or paged through a shuffled
page table, and fills every slot and page that holds no position with
finite garbage. ``expected`` then computes the attention in float64 NumPy
from the history alone: query t of a sequence of length L sits at L - T + t
and sees the positions p <= its own, p > its own - window, and
p >= L - C (older ones were overwritten), so the ring rule is tested, not
assumed. Quantized caches quantize the history (kv_formats.quantize_kv) and
the expectation uses the dequantized history: the kernels are checked for
their arithmetic, not for the format's rounding. KIVI-2 caches are built by
appending each sequence's history through kv_formats.kivi2_append in chunks,
and the expectation decodes what it stored in NumPy (unpacking the planar
codes itself): complete groups from the slots, the group still filling from
the residual.

Tolerance: relative error ||got - want|| / ||want|| under 1e-5 with float32
queries, under 1e-2 with 16-bit ones (bf16 probabilities and output).
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention import quantize_kv
from pallas_kernels.decode_attention.kv_formats import kivi2_append, kivi2_cache

F32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2
GARBAGE = 3.0  # scale of the finite values in slots and pages that hold no position


@dataclasses.dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...]
    num_queries: int              # T
    heads: int                    # Hq
    kv_heads: int                 # Hkv
    head_dim: int
    capacity: int                 # C
    dtype: object = jnp.float32   # q (and unquantized k, v)
    page_size: int | None = None  # None: contiguous cache
    spare_pages: int = 3          # pool pages no sequence owns
    k_format: str | None = None   # None, 'int8', 'fp8' or 'kivi2' (k and v)
    v_format: str | None = None
    kivi_group: int = 16          # KIVI-2: tokens per key group, channels per value group
    kivi_value_group: int = 16
    sliding_window: int | None = None
    logit_softcap: float | None = None
    scale: float | None = None
    block_kv: int | None = None   # contiguous caches, portable kernel
    num_splits: int | None = None
    mosaic_block_kv: int | None = None

    @property
    def batch(self):
        return len(self.lengths)

    @property
    def tolerance(self):
        return F32_TOL if self.dtype == jnp.float32 else LOW_PRECISION_TOL

    def kwargs(self):
        return dict(sliding_window=self.sliding_window, logit_softcap=self.logit_softcap,
                    scale=self.scale)

    def tiling(self):
        return dict(block_kv=self.block_kv, num_splits=self.num_splits)


BF16, F16 = jnp.bfloat16, jnp.float16
CASES = {
    # Lengths: full, partial, 1 and 0; capacities not a multiple of the block.
    "t1_gqa_d64": Case((37, 20, 1), 1, 4, 2, 64, 37, block_kv=16, num_splits=2),
    "t3_mqa_d128": Case((0, 3, 45), 3, 6, 1, 128, 45, block_kv=16, num_splits=3),
    "paged_shuffled": Case((48, 17, 0), 1, 4, 2, 64, 48, page_size=8, num_splits=2),
    "ring_window": Case((20, 57, 5), 3, 4, 2, 64, 20, sliding_window=12, block_kv=16),
    "paged_ring_window_softcap": Case((100, 31, 2), 3, 6, 1, 128, 32, page_size=16,
                                      sliding_window=24, logit_softcap=5.0, scale=0.3),
    "softcap_no_window_wraps": Case((90, 7, 40), 1, 4, 2, 64, 40, logit_softcap=2.0,
                                    block_kv=32),
    "int8": Case((37, 20, 1), 1, 4, 2, 64, 37, k_format="int8", v_format="int8", block_kv=16),
    "fp8_paged_t3": Case((29, 48, 3), 3, 4, 2, 128, 48, page_size=16, k_format="fp8",
                         v_format="fp8"),
    "bf16": Case((104, 64, 1), 1, 4, 2, 128, 104, BF16, num_splits=3),
    # Llama-3's 8 query heads a kv head (whole 8-row query tiles), lengths 0 to full.
    "bf16_gqa8": Case((128, 70, 0, 33), 1, 16, 2, 128, 128, BF16),
    "bf16_fp8_paged_ring": Case((150, 40, 0), 3, 4, 2, 128, 64, BF16, page_size=8,
                                k_format="fp8", v_format="fp8", sliding_window=30),
    "f16_t3_mqa_softcap_int8_values": Case((77, 5, 130), 3, 6, 1, 64, 136, F16,
                                           v_format="int8", logit_softcap=3.0, num_splits=2,
                                           mosaic_block_kv=128),
    "f16_paged_window": Case((70, 33, 9), 3, 6, 1, 64, 64, F16, page_size=32, sliding_window=40),
    "bf16_int8_keys_window": Case((61, 2, 30), 3, 4, 2, 128, 40, BF16, k_format="int8",
                                  sliding_window=30, num_splits=2),
    # KIVI-2: residuals of 13, 0 (a whole group) and 5 tokens; a ring wrapped
    # twice with a window over pages of two groups.
    "kivi2": Case((45, 16, 0), 1, 4, 2, 64, 48, k_format="kivi2", v_format="kivi2",
                  num_splits=2),
    "kivi2_paged_ring_window": Case((150, 37, 5), 3, 6, 1, 128, 64, BF16, page_size=32,
                                    k_format="kivi2", v_format="kivi2", sliding_window=40,
                                    kivi_value_group=32),
}


def _ring_cache(history, lengths, capacity, rng):
    """[B, C, ...] cache of a [B, maxL, ...] history: slot p % C holds the
    newest position p < L; slots with no position hold garbage."""
    B = history.shape[0]
    cache = GARBAGE * rng.standard_normal((B, capacity, *history.shape[2:]))
    for b, L in enumerate(lengths):
        for p in range(max(0, L - capacity), L):
            cache[b, p % capacity] = history[b, p]
    return cache


def _paged(cache, table, pages, rng):
    """A contiguous [B, C, ...] cache (any dtype) as a pool [pages, page_size,
    ...]: logical block j of sequence b in page table[b, j], the other pages
    garbage."""
    cache = np.asarray(cache)
    B, per_seq = table.shape
    page_size = cache.shape[1] // per_seq
    shape = (pages, page_size, *cache.shape[2:])
    if cache.dtype == np.uint8:
        pool = rng.integers(0, 256, shape).astype(np.uint8)
    else:
        pool = (GARBAGE * rng.standard_normal(shape)).astype(cache.dtype)
    for b in range(B):
        for j in range(per_seq):
            pool[table[b, j]] = cache[b, j * page_size:(j + 1) * page_size]
    return pool


def _as_stored(x, fmt, dtype):
    """A float64 cache as the implementation gets it, and its float64 values."""
    if fmt is None:
        stored = jnp.asarray(x, dtype)
        return stored, np.asarray(stored, np.float64)
    q = quantize_kv(jnp.asarray(x, jnp.float32), fmt)
    values = np.asarray(q.data, np.float64) * np.asarray(q.scale, np.float64)[..., None]
    return q, values


@functools.lru_cache(maxsize=None)
def case_inputs(name):
    """(q, k, v, lengths, page_table) of a case, and (q, k history, v
    history) in float64 for ``expected``; seeded by the case's name. Paged
    caches get a shuffled page table and spare pages; the table rows of
    length-0 sequences are -1 (never read: the kernels clamp page ids)."""
    case = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    B, T, D = case.batch, case.num_queries, case.head_dim
    q = jnp.asarray(rng.standard_normal((B, T, case.heads, D)), case.dtype)
    table = page_table = None
    if case.page_size:
        per_seq = case.capacity // case.page_size
        pages = B * per_seq + case.spare_pages
        table = rng.permutation(pages)[:B * per_seq].reshape(B, per_seq)
        empty = np.asarray(case.lengths) == 0
        page_table = jnp.asarray(np.where(empty[:, None], -1, table), jnp.int32)
    stored, values = {}, {}
    if case.k_format == "kivi2":
        return _kivi_inputs(case, q, page_table, table, rng)
    for which, fmt in (("k", case.k_format), ("v", case.v_format)):
        history = rng.standard_normal((B, max(case.lengths), case.kv_heads, D))
        cache = _ring_cache(history, case.lengths, case.capacity, rng)
        if table is not None:
            cache = _paged(cache, table, pages, rng)
        stored[which] = _as_stored(cache, fmt, case.dtype)[0]
        # Quantization is per token and head: the history's values after the
        # format's rounding are those the cache holds.
        values[which] = _as_stored(history, fmt, case.dtype)[1]
    lengths = jnp.asarray(case.lengths, jnp.int32)
    return ((q, stored["k"], stored["v"], lengths, page_table),
            (np.asarray(q, np.float64), values["k"], values["v"]))


_APPEND = jax.jit(kivi2_append)
CHUNK = 16  # tokens a KIVI-2 append call takes while a case's cache is built


def _kivi_inputs(case, q, page_table, table, rng):
    """case_inputs of a KIVI-2 case: each sequence's history appended in
    chunks to its own cache, the caches stacked (and paged); the float64
    values are decoded from what was stored."""
    B, D, Hkv, G = case.batch, case.head_dim, case.kv_heads, case.kivi_group
    top = max(max(case.lengths), 1)
    hist = {w: rng.standard_normal((B, top, Hkv, D)).astype(np.float32) for w in "kv"}
    caches = []
    for b, L in enumerate(case.lengths):
        cache = kivi2_cache((1, case.capacity, Hkv, D), 1, group=G,
                            value_group=case.kivi_value_group)
        for start in range(0, L, CHUNK):
            stop = min(L, start + CHUNK)
            cache = _APPEND(*cache, hist["k"][b:b + 1, start:stop], hist["v"][b:b + 1, start:stop],
                            jnp.array([start], jnp.int32))
        caches.append(cache)
    keys, values = (jax.tree.map(lambda *a: np.concatenate(a), *[c[i] for c in caches])
                    for i in (0, 1))
    decoded = [_decode_kivi(x, case.lengths, case.capacity, top) for x in (keys, values)]
    if table is not None:
        pages = table.size + case.spare_pages
        keys, values = (type(x)(*(_paged(a, table, pages, rng) for a in x[:3]), x.residual)
                        for x in (keys, values))
    keys, values = (jax.tree.map(jnp.asarray, x) for x in (keys, values))
    lengths = jnp.asarray(case.lengths, jnp.int32)
    return (q, keys, values, lengths, page_table), (np.asarray(q, np.float64), *decoded)


def _decode_kivi(x, lengths, capacity, top):
    """[B, top, Hkv, D] float64: position p of sequence b as the contiguous
    KIVI-2 tensor x stores it (slot p mod C, or residual row p mod G)."""
    packed = np.asarray(x.codes)
    D4 = packed.shape[-1]
    codes = np.concatenate([(packed >> (2 * j)) & 3 for j in range(4)], axis=-1)
    scale, zero = (np.asarray(a, np.float64) for a in (x.scale, x.zero))
    G = x.residual.shape[1]
    if scale.shape[-1] == 4 * D4:  # keys: a row per group of slots
        scale, zero = np.repeat(scale, G, axis=1), np.repeat(zero, G, axis=1)
    else:  # values: a column per group of channels
        width = 4 * D4 // scale.shape[-1]
        scale, zero = np.repeat(scale, width, axis=-1), np.repeat(zero, width, axis=-1)
    slots = codes * scale + zero
    out = np.zeros((len(lengths), top, *slots.shape[2:]))
    for b, L in enumerate(lengths):
        for p in range(max(0, L - capacity), L):
            out[b, p] = (np.asarray(x.residual[b, p % G], np.float64) if p >= L - L % G
                         else slots[b, p % capacity])
    return out


def expected(case, q, k_hist, v_hist):
    """[B, T, Hq, D] float64 from the histories (see the module docstring)."""
    B, T, Hq, D = q.shape
    G = Hq // case.kv_heads
    scale = D ** -0.5 if case.scale is None else case.scale
    out = np.zeros(q.shape)
    for b, L in enumerate(case.lengths):
        for t in range(T):
            pos = L - T + t
            lo = max(0, L - case.capacity)
            if case.sliding_window is not None:
                lo = max(lo, pos - case.sliding_window + 1)
            seen = np.arange(lo, pos + 1) if pos >= 0 else np.arange(0)
            if not seen.size:
                continue
            for h in range(Hq):
                logits = k_hist[b, seen, h // G] @ q[b, t, h] * scale
                if case.logit_softcap is not None:
                    logits = case.logit_softcap * np.tanh(logits / case.logit_softcap)
                p = np.exp(logits - logits.max())
                out[b, t, h] = p @ v_hist[b, seen, h // G] / p.sum()
    return out


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm((got - want).ravel()) / np.linalg.norm(want.ravel()))


@functools.lru_cache(maxsize=None)
def _expected(name):
    return expected(CASES[name], *case_inputs(name)[1])


def check(name, attention):
    """attention(q, k, v, lengths, page_table) on a case, against ``expected``:
    q's dtype and shape, finite, zero for queries that see nothing, within
    the case's tolerance."""
    case = CASES[name]
    args = case_inputs(name)[0]
    got = attention(*args)
    want = _expected(name)
    assert got.dtype == case.dtype and got.shape == want.shape
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    blind = ~np.abs(want).any(axis=-1)  # queries that see no position
    assert (got[blind] == 0).all()
    err = relative_error(got, want)
    assert err < case.tolerance, f"relative error {err:.2e} >= {case.tolerance:.0e}"
