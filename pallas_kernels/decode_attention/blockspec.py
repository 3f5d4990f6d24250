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


def online_softmax(m, l, s):
    """One block's step of the online softmax: (max, sum, p, alpha) after
    logits s [rows, block] (-inf where masked) for running max m and sum l."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # Rows that have seen nothing keep m = -inf: shift by 0 so exp gives 0.
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_shift[:, None])
    alpha = jnp.exp(m - m_shift)
    return m_new, l * alpha + jnp.sum(p, axis=1), p, alpha


def masked_logits(s, q_pos, k_pos, cfg):
    """Scaled products s [rows, block] -> logits: soft-capped, -inf where
    the row's query does not see the column's position."""
    s = s * cfg.scale
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    return jnp.where(visible(q_pos[:, None], k_pos[None, :], cfg.window), s, -jnp.inf)


def walk(step, carry, L, split, cfg):
    """carry after step(j, carry) over the split's blocks that hold a
    visible slot (positions.visible_blocks: at most two ranges)."""
    lo = split * cfg.blocks_per_split
    hi = jnp.minimum(lo + cfg.blocks_per_split, cdiv(cfg.capacity, cfg.step))
    first, end, first2, end2 = visible_blocks(L, cfg.capacity, cfg.num_queries, cfg.window,
                                              cfg.step, lo, hi)
    carry = lax.fori_loop(first, end, step, carry)
    return lax.fori_loop(first2, end2, step, carry)


def write_partial(o_ref, lse_ref, m, l, pieces):
    """The split's output normalised by its softmax sum (``pieces``: column
    blocks of equal width, in order) and its logsumexp (-inf: saw nothing)."""
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    width = pieces[0].shape[1]
    for i, acc in enumerate(pieces):
        o_ref[:, pl.ds(i * width, width)] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def query_positions(L, rows, cfg):
    """Position of each query row's token (rows t * G + g)."""
    return query_position(L, lax.div(lax.iota(jnp.int32, rows), cfg.group), cfg.num_queries)


def _kernel(*refs, cfg: _Config, k_quant: bool, v_quant: bool, paged: bool):
    refs = list(refs)
    lengths_ref, q_ref, k_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    ks_ref = refs.pop(0) if k_quant else None
    v_ref = refs.pop(0)
    vs_ref = refs.pop(0) if v_quant else None
    pages_ref = refs.pop(0) if paged else None
    o_ref, lse_ref = refs

    L = jnp.maximum(lengths_ref[0], 0)
    C = cfg.capacity
    q = q_ref[...]
    q_pos = query_positions(L, q.shape[0], cfg)

    def step(j, carry):
        m, l, acc = carry
        k, k_scale = _load_block(k_ref, ks_ref, j, pages_ref, cfg)
        v, v_scale = _load_block(v_ref, vs_ref, j, pages_ref, cfg)
        dtype = q.dtype if k_quant else jnp.promote_types(q.dtype, k.dtype)
        s = _dot(q.astype(dtype), k.astype(dtype), (1, 1))
        if k_quant:
            s = s * k_scale[None, :]
        rows = lax.iota(jnp.int32, cfg.block)
        slots = j * cfg.step + rows
        k_pos = slot_position(L, slots, C)
        if cfg.block != cfg.step or C % cfg.block:  # padding rows hold no position
            k_pos = jnp.where((slots < C) & (rows < cfg.step), k_pos, -1)
        m, l, p, alpha = online_softmax(m, l, masked_logits(s, q_pos, k_pos, cfg))
        if v_quant:
            p = p * v_scale[None, :]
        vdt = q.dtype if v_quant else jnp.promote_types(q.dtype, v.dtype)
        return m, l, acc * alpha[:, None] + _dot(p.astype(vdt), v.astype(vdt), (1, 0))

    rows = q.shape[0]
    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    m, l, acc = walk(step, carry, L, pl.program_id(2), cfg)
    write_partial(o_ref, lse_ref, m, l, [acc])


def head_spec(shape, paged: bool):
    """BlockSpec of one kv head of a leaf [N, S, Hkv, ...]: the sequence's
    row (contiguous) or the whole pool (paged)."""
    N, S, _, *rest = shape
    zeros = (0,) * len(rest)
    if paged:
        return pl.BlockSpec((N, S, None, *rest), lambda b, h, s: (0, 0, h, *zeros))
    return pl.BlockSpec((None, S, None, *rest), lambda b, h, s: (b, 0, h, *zeros))


def _cache_specs(x, paged: bool):
    """BlockSpecs and operands of a cache tensor (data, then scales)."""
    leaves = [x.data, x.scale] if isinstance(x, QuantizedKV) else [x]
    return [head_spec(a.shape, paged) for a in leaves], leaves


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


def plan(B, Hkv, T, Hq, capacity, step, num_splits):
    """(splits, blocks per split, query rows) of a call."""
    n_blocks = cdiv(capacity, step)
    splits = min(num_splits or sp.default_splits(B * Hkv, n_blocks, compat.sm_count()), n_blocks)
    per_split = cdiv(n_blocks, splits)
    rows = max(MIN_TILE, pl.next_power_of_2(T * (Hq // Hkv)))
    return cdiv(n_blocks, per_split), per_split, rows


def launch(kernel, cfg, q, lengths, specs, operands, splits: int, rows: int, kv_heads: int):
    """Run ``kernel`` over the grid (sequence, kv head, split) with q's rows,
    lengths and the given operands, and merge the splits -> [B, T, Hq, D]."""
    B, T, Hq, D = q.shape
    row_block = pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(B, kv_heads, splits),
        in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                  pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)), *specs],
        out_specs=[row_block,
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, kv_heads, splits, rows, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, kv_heads, splits, rows), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, D),
        name="decode_attention",
    )(lengths, sp.query_rows(q, kv_heads, rows), *operands)
    return sp.merge_query_rows(out, lse, T, Hq, q.dtype)


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
    N, S, Hkv, _ = k.shape
    paged = page_table is not None
    if paged:
        capacity, page_size = page_table.shape[1] * S, S
        block, step = max(MIN_TILE, pl.next_power_of_2(S)), S
    else:
        capacity, page_size = S, None
        block = step = block_kv or min(DEFAULT_BLOCK_KV, max(MIN_TILE, pl.next_power_of_2(S)))
    splits, per_split, rows = plan(B, Hkv, T, Hq, capacity, step, num_splits)
    cfg = _Config(num_queries=T, group=Hq // Hkv, capacity=capacity, page_size=page_size,
                  block=block, blocks_per_split=per_split, window=sliding_window,
                  softcap=logit_softcap, scale=D ** -0.5 if scale is None else float(scale),
                  interpret=interpret)
    k_specs, k_args = _cache_specs(k, paged)
    v_specs, v_args = _cache_specs(v, paged)
    specs, operands = k_specs + v_specs, k_args + v_args
    if paged:
        specs.append(pl.BlockSpec((None, page_table.shape[1]), lambda b, h, s: (b, 0)))
        operands.append(page_table)
    kernel = functools.partial(_kernel, cfg=cfg, k_quant=isinstance(k, QuantizedKV),
                               v_quant=isinstance(v, QuantizedKV), paged=paged)
    return launch(kernel, cfg, q, lengths, specs, operands, splits, rows, Hkv)
