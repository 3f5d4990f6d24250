"""The portable decode kernel for KIVI-2 caches (kv_formats.Kivi2Keys /
Kivi2Values): blockspec.py's grid, walk, online softmax and merge, with
blocks of one key group (G slots) read as codes and dequantized on the fly.

The codes are packed planar: byte i holds channels i + j * D/4 in bits 2j,
2j+1, so bit plane j is a dense [G, D/4] code matrix of one quarter of the
channels, taken out with a shift and a mask; no relayout is needed.

Keys (per channel over the group: k = c * s + z, s and z rows [D]):
q.k = sum_j (q_j * s_j) . c_j + q . z, four dots of a quarter of head_dim
and a per-row constant (z differs between groups, so it stays in).
Values (per slot, groups of Gv channels: v = c * s_g + z_g): channel group g
lies in plane j = g // (D/4/Gv), bytes u*Gv.. of it, and
p . v_g = (p * s_g) . c_g + (p . z_g), one dot per group into that group's
columns of the output.

The residual (positions L - L mod G .. L-1, full precision) is one more block
of G rows, walked by split 0 after its cache blocks; cache slots holding
those positions are masked (their codes are a group not yet written).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import blockspec as bs
from pallas_kernels.decode_attention.kv_formats import KIVI_PER_BYTE
from pallas_kernels.decode_attention.positions import slot_position


def unsupported(k, v, page_table) -> str | None:
    """Why the portable kernel cannot read these KIVI-2 caches (None if it can)."""
    G, Gv = k.group, v.value_group
    if G < bs.MIN_TILE or G & (G - 1):
        return f"KIVI-2 group={G} must be a power of two >= {bs.MIN_TILE} (Triton tiles)"
    if Gv < bs.MIN_TILE or Gv & (Gv - 1):
        return f"KIVI-2 value_group={Gv} must be a power of two >= {bs.MIN_TILE}"
    if page_table is not None and k.shape[1] % G:
        return f"page_size={k.shape[1]} must be a multiple of the KIVI-2 group {G}"
    return None


def _kernel(lengths_ref, q_ref, kc_ref, ks_ref, kz_ref, kr_ref, vc_ref, vs_ref, vz_ref, vr_ref,
            *refs, cfg, value_group: int, page_size: int | None):
    paged = page_size is not None
    pages_ref, o_ref, lse_ref = refs if paged else (None, *refs)
    G, C = cfg.step, cfg.capacity
    L = jnp.maximum(lengths_ref[0], 0)
    base = L - lax.rem(L, G)  # positions from here on are in the residual
    rows, D = q_ref.shape
    quarter = D // KIVI_PER_BYTE
    per_plane = quarter // value_group
    q = q_ref[...].astype(jnp.float32)
    q_pos = bs.query_positions(L, rows, cfg)

    def where(j):
        """(page, first row) of block j's slots in the storage leaves."""
        if not paged:
            return None, j * G
        slot = j * G
        page = jnp.clip(pages_ref[lax.div(slot, page_size)], 0, kc_ref.shape[0] - 1)
        return page, lax.rem(slot, page_size)

    def rows_of(ref, page, first, n, cols=None):
        idx = (pl.ds(first, n),) if cols is None else (pl.ds(first, n), cols)
        return ref[(page, *idx)] if paged else ref[idx]

    def rescaled(pieces, alpha, p, piece):
        """The output's column groups after a block: piece(g, p) is group
        g's [rows, Gv] contribution of probabilities p."""
        return [acc * alpha[:, None] + piece(g, p) for g, acc in enumerate(pieces)]

    def step(j, carry):
        m, l, pieces = carry
        page, first = where(j)
        codes = rows_of(kc_ref, page, first, G)  # [G, D/4] uint8
        group_row = lax.div(first, G)
        k_zero = rows_of(kz_ref, page, group_row, 1).astype(jnp.float32)  # [1, D]
        s = jnp.sum(q * k_zero, axis=1)[:, None]
        for plane in range(KIVI_PER_BYTE):
            cols = pl.ds(plane * quarter, quarter)
            c = ((codes >> (2 * plane)) & 3).astype(jnp.float32)
            k_scale = rows_of(ks_ref, page, group_row, 1, cols).astype(jnp.float32)  # [1, D/4]
            s = s + bs._dot(q_ref[:, cols].astype(jnp.float32) * k_scale, c, (1, 1))
        k_pos = slot_position(L, j * G + lax.iota(jnp.int32, G), C)
        k_pos = jnp.where(k_pos >= base, -1, k_pos)  # held by the residual instead
        m, l, p, alpha = bs.online_softmax(m, l, bs.masked_logits(s, q_pos, k_pos, cfg))

        def piece(g, p):
            plane, u = divmod(g, per_plane)
            c = (rows_of(vc_ref, page, first, G, pl.ds(u * value_group, value_group))
                 >> (2 * plane)) & 3
            v_scale = rows_of(vs_ref, page, first, G, g).astype(jnp.float32)  # [G]
            v_zero = rows_of(vz_ref, page, first, G, g).astype(jnp.float32)
            return (bs._dot(p * v_scale[None, :], c.astype(jnp.float32), (1, 0))
                    + jnp.sum(p * v_zero[None, :], axis=1)[:, None])
        return m, l, rescaled(pieces, alpha, p, piece)

    def residual(carry):
        m, l, pieces = carry
        i = lax.iota(jnp.int32, G)
        k_pos = jnp.where(base + i < L, base + i, -1)
        s = bs._dot(q, kr_ref[...].astype(jnp.float32), (1, 1))
        m, l, p, alpha = bs.online_softmax(m, l, bs.masked_logits(s, q_pos, k_pos, cfg))

        def piece(g, p):
            v = vr_ref[:, pl.ds(g * value_group, value_group)].astype(jnp.float32)
            return bs._dot(p, v, (1, 0))
        return m, l, rescaled(pieces, alpha, p, piece)

    split = pl.program_id(2)
    pieces = [jnp.zeros((rows, value_group), jnp.float32) for _ in range(D // value_group)]
    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32), pieces)
    carry = bs.walk(step, carry, L, split, cfg)
    m, l, pieces = lax.cond(split == 0, residual, lambda c: c, carry)
    bs.write_partial(o_ref, lse_ref, m, l, pieces)


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "scale",
                                             "block_kv", "num_splits", "interpret"))
def kivi_decode_attention(q, k, v, lengths, page_table=None, *, sliding_window=None,
                          logit_softcap=None, scale=None, block_kv=None, num_splits=None,
                          interpret=False):
    """Decode attention (see reference.py) over a KIVI-2 cache by the
    portable kernel; arguments as checked by api.decode_attention (blocks
    are key groups: block_kv must be None)."""
    assert block_kv is None, "KIVI-2 caches are walked by key group"
    B, T, Hq, D = q.shape
    N, S, Hkv, _ = k.shape
    G = k.group
    paged = page_table is not None
    capacity = page_table.shape[1] * S if paged else S
    splits, per_split, rows = bs.plan(B, Hkv, T, Hq, capacity, G, num_splits)
    # Blocks are key groups (page_size None: the walk steps by block), inside pages.
    cfg = bs._Config(num_queries=T, group=Hq // Hkv, capacity=capacity,
                     page_size=None, block=G, blocks_per_split=per_split,
                     window=sliding_window, softcap=logit_softcap,
                     scale=D ** -0.5 if scale is None else float(scale), interpret=interpret)
    leaves = [k.codes, k.scale, k.zero, v.codes, v.scale, v.zero]
    specs = [bs.head_spec(a.shape, paged) for a in leaves]
    residual = bs.head_spec(k.residual.shape, False)
    specs = specs[:3] + [residual] + specs[3:] + [residual]
    operands = leaves[:3] + [k.residual] + leaves[3:] + [v.residual]
    if paged:
        specs.append(pl.BlockSpec((None, page_table.shape[1]), lambda b, h, s: (b, 0)))
        operands.append(page_table)
    kernel = functools.partial(_kernel, cfg=cfg, value_group=v.value_group,
                               page_size=S if paged else None)
    return bs.launch(kernel, cfg, q, lengths, specs, operands, splits, rows, Hkv)
