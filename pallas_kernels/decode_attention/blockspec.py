"""Portable decode attention in BlockSpec-style Pallas (flash-decoding).

Runs interpreted on CPU and compiles through Pallas's Triton lowering on any
NVIDIA GPU. The grid is (sequence, kv head, split): each program takes every
query row of its kv head's group (splits.query_rows: G heads x T tokens,
padded to a power of two >= 16 for the GPU's dot) against one split of the
cache and walks it in blocks with an online softmax, writing its normalised
partial output and logsumexp; splits.merge combines the splits in XLA.

Blocks: a contiguous cache is walked in ``block_kv`` slots, a paged one page
by page (page ids read from the program's page-table row). Only the blocks
holding a slot some query sees are visited (positions.visible_blocks: at
most two ranges, where the ring wraps); the others, past the length or
outside the window, are never loaded. Loads are masked: slots past the capacity
(a partial last block) and rows past the page size read as zeros.

Triton's lowering takes no scalar prefetch, so the page table and lengths are
ordinary inputs: each program reads its row of the table and its length as
scalars. Quantized caches are read as codes and dequantized in the program:
the key scales multiply the logits' columns, the value scales the
probabilities' columns, so the dots run on the codes (exact in the query's
dtype).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import compat
from pallas_kernels.decode_attention import splits as sp
from pallas_kernels.decode_attention.kv_formats import QuantizedKV
from pallas_kernels.decode_attention.positions import (query_position, slot_position, visible,
                                                       visible_blocks)
from pallas_kernels.shapes import cdiv

MIN_TILE = 16  # smallest dot operand side on a GPU
DEFAULT_BLOCK_KV = 64


@dataclasses.dataclass(frozen=True)
class _Config:
    num_queries: int      # T
    group: int            # G
    capacity: int         # C, logical slots per sequence
    page_size: int | None  # None: contiguous
    block: int            # slots a step loads (paged: the page size rounded up)
    blocks_per_split: int
    window: int | None
    softcap: float | None
    scale: float
    interpret: bool

    @property
    def step(self):
        """Slots a block covers (the page size, or the block when contiguous)."""
        return self.page_size or self.block


def _dot(a, b, contract):
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           preferred_element_type=jnp.float32)


def _load_block(ref, scale_ref, j, pages_ref, cfg: _Config):
    """Block j of one kv head's cache: (values or codes [block, D], scales
    [block] or None); slots past the capacity or the page read as zero."""
    rows = lax.iota(jnp.int32, cfg.block)
    if cfg.page_size is None:
        start = j * cfg.block
        view = lambda r: r.at[pl.ds(start, cfg.block)]  # noqa: E731
        ok = start + rows < cfg.capacity
        needs_mask = cfg.capacity % cfg.block != 0
    else:
        page = jnp.clip(pages_ref[j], 0, ref.shape[0] - 1)
        view = lambda r: r.at[page, pl.ds(0, cfg.block)]  # noqa: E731
        ok = rows < cfg.page_size
        needs_mask = cfg.block != cfg.page_size

    def load(r, mask):
        return (pltriton.load(view(r), mask=mask, other=jnp.zeros((), r.dtype)) if needs_mask
                else view(r)[...])
    data = load(ref, ok[:, None])
    scale = None if scale_ref is None else load(scale_ref, ok)
    return data, scale


def _kernel(*refs, cfg: _Config, k_quant: bool, v_quant: bool, paged: bool):
    refs = list(refs)
    lengths_ref, q_ref, k_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    ks_ref = refs.pop(0) if k_quant else None
    v_ref = refs.pop(0)
    vs_ref = refs.pop(0) if v_quant else None
    pages_ref = refs.pop(0) if paged else None
    o_ref, lse_ref = refs

    split = pl.program_id(2)
    L = jnp.maximum(lengths_ref[0], 0)
    C, T = cfg.capacity, cfg.num_queries
    q = q_ref[...]
    rows = q.shape[0]
    q_pos = query_position(L, lax.div(lax.iota(jnp.int32, rows), cfg.group), T)
    def step(j, carry):
        m, l, acc = carry
        k, k_scale = _load_block(k_ref, ks_ref, j, pages_ref, cfg)
        v, v_scale = _load_block(v_ref, vs_ref, j, pages_ref, cfg)
        dtype = q.dtype if k_quant else jnp.promote_types(q.dtype, k.dtype)
        s = _dot(q.astype(dtype), k.astype(dtype), (1, 1)) * cfg.scale
        if k_quant:
            s = s * k_scale[None, :]
        if cfg.softcap is not None:
            s = cfg.softcap * jnp.tanh(s / cfg.softcap)
        slots = j * cfg.step + lax.iota(jnp.int32, cfg.block)
        ok = visible(q_pos[:, None], slot_position(L, slots, C)[None, :], cfg.window)
        if cfg.block != cfg.step or C % cfg.block:
            ok &= (slots < C)[None, :] & (lax.iota(jnp.int32, cfg.block) < cfg.step)[None, :]
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Rows that have seen nothing keep m = -inf: shift by 0 so exp gives 0.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_shift[:, None])
        alpha = jnp.exp(m - m_shift)
        l = l * alpha + jnp.sum(p, axis=1)
        if v_quant:
            p = p * v_scale[None, :]
        vdt = q.dtype if v_quant else jnp.promote_types(q.dtype, v.dtype)
        acc = acc * alpha[:, None] + _dot(p.astype(vdt), v.astype(vdt), (1, 0))
        return m_new, l, acc

    lo = split * cfg.blocks_per_split
    hi = jnp.minimum(lo + cfg.blocks_per_split, cdiv(C, cfg.step))
    first, end, first2, end2 = visible_blocks(L, C, T, cfg.window, cfg.step, lo, hi)
    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    carry = lax.fori_loop(first, end, step, carry)
    m, l, acc = lax.fori_loop(first2, end2, step, carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _cache_specs(x, paged: bool):
    """BlockSpecs of one kv head of a cache tensor (data, then scales)."""
    data = x.data if isinstance(x, QuantizedKV) else x
    N, S, _, D = data.shape
    if paged:
        specs = [pl.BlockSpec((N, S, None, D), lambda b, h, s: (0, 0, h, 0))]
        scale = pl.BlockSpec((N, S, None), lambda b, h, s: (0, 0, h))
    else:
        specs = [pl.BlockSpec((None, S, None, D), lambda b, h, s: (b, 0, h, 0))]
        scale = pl.BlockSpec((None, S, None), lambda b, h, s: (b, 0, h))
    if isinstance(x, QuantizedKV):
        return specs + [scale], [x.data, x.scale]
    return specs, [x]


def _compiler_params(cfg: _Config, head_dim: int):
    if cfg.interpret:
        return None
    return compat.triton_compiler_params(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def unsupported(q, k) -> str | None:
    """Why the portable kernel cannot take these shapes (None if it can)."""
    D = q.shape[3]
    if D < MIN_TILE or D & (D - 1):
        return f"head_dim={D} must be a power of two >= {MIN_TILE} (Triton tiles)"
    return None


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "scale",
                                             "block_kv", "num_splits", "interpret"))
def blockspec_decode_attention(q, k, v, lengths, page_table=None, *, sliding_window=None,
                               logit_softcap=None, scale=None, block_kv=None, num_splits=None,
                               interpret=False):
    """Decode attention (see reference.py) by the portable kernel; arguments
    as checked by api.decode_attention. block_kv: slots a step of a
    contiguous cache loads (a power of two >= 16; paged caches step by
    page); num_splits: splits of the cache length (None: enough programs to
    fill the GPU's waves)."""
    B, T, Hq, D = q.shape
    data = k.data if isinstance(k, QuantizedKV) else k
    Hkv = data.shape[2]
    paged = page_table is not None
    if paged:
        page_size = data.shape[1]
        capacity = page_table.shape[1] * page_size
        block = max(MIN_TILE, pl.next_power_of_2(page_size))
        step = page_size
    else:
        page_size = None
        capacity = data.shape[1]
        block = block_kv or min(DEFAULT_BLOCK_KV, max(MIN_TILE, pl.next_power_of_2(capacity)))
        step = block
    n_blocks = cdiv(capacity, step)
    splits = num_splits or sp.default_splits(B * Hkv, n_blocks, compat.sm_count())
    splits = min(splits, n_blocks)
    per_split = cdiv(n_blocks, splits)
    splits = cdiv(n_blocks, per_split)
    cfg = _Config(num_queries=T, group=Hq // Hkv, capacity=capacity, page_size=page_size,
                  block=block, blocks_per_split=per_split, window=sliding_window,
                  softcap=logit_softcap, scale=D ** -0.5 if scale is None else float(scale),
                  interpret=interpret)
    rows = max(MIN_TILE, pl.next_power_of_2(T * cfg.group))
    q_rows = sp.query_rows(q, Hkv, rows)
    k_specs, k_args = _cache_specs(k, paged)
    v_specs, v_args = _cache_specs(v, paged)
    extra_specs, extra_args = [], []
    if paged:
        extra_specs = [pl.BlockSpec((None, page_table.shape[1]), lambda b, h, s: (b, 0))]
        extra_args = [page_table]
    row_block = pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0))
    out, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, k_quant=isinstance(k, QuantizedKV),
                          v_quant=isinstance(v, QuantizedKV), paged=paged),
        grid=(B, Hkv, splits),
        in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                  pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),
                  *k_specs, *v_specs, *extra_specs],
        out_specs=[row_block,
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, splits, rows, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, splits, rows), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(cfg, D),
        name="decode_attention",
    )(lengths, q_rows, *k_args, *v_args, *extra_args)
    merged = sp.merge(out, lse)
    return sp.from_query_rows(merged, T, Hq).astype(q.dtype)
