"""Portable block-sparse attention in BlockSpec-style Pallas, forward and
backward.

Runs interpreted on CPU and compiles through Pallas's Triton lowering on any
NVIDIA GPU. Triton's lowering takes no scalar prefetch, so the lists are
ordinary inputs (as decode attention's page table): a program reads its
list row and loops over the listed blocks only, slicing K and V (or Q, dO)
at the listed offset; unlisted blocks are never loaded.

  forward, dQ  grid (batch, query head, query block): one list row each;
  dK/dV        grid (batch, kv head, key block): for each query head of the
               group, the query blocks whose lists hold this key block, read
               from the transposed lists (lists.transposed_lists, built in
               XLA in the backward pass). Each program writes its own tile:
               no atomics, no second pass.

Every visited tile is masked (causal, segment ids, padded keys); the
backward is FlashAttention-2's (probabilities recomputed from the saved
logsumexp, delta = rowsum(dO * O)). Rows that see no key get output 0,
logsumexp -inf, and zero gradients.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.attention.mask import visible
from pallas_kernels.block_sparse_attention.lists import transposed_lists
from pallas_kernels.decode_attention.blockspec import online_softmax
from pallas_kernels.shapes import pad_to

MIN_BLOCK = 16  # smallest dot operand side on a GPU


def unsupported(q, block_q: int, block_k: int) -> str | None:
    """Why the portable kernel cannot take these tiles (None if it can)."""
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < MIN_BLOCK or size & (size - 1):
            return f"{name}={size} must be a power of two >= {MIN_BLOCK} (Triton tiles)"
    del q
    return None


@dataclasses.dataclass(frozen=True)
class _Config:
    q_len: int
    kv_len: int
    padded_kv_len: int
    group: int        # query heads per kv head
    list_group: int   # query heads per list row: group (lists per kv head) or 1
    causal: bool
    has_segments: bool
    scale: float
    block_q: int
    block_k: int
    interpret: bool

    def q_positions(self, q_block):
        return q_block * self.block_q + lax.iota(jnp.int32, self.block_q) + (
            self.kv_len - self.q_len)

    def k_positions(self, k_block):
        return k_block * self.block_k + lax.iota(jnp.int32, self.block_k)

    def mask(self, q_pos, k_pos, q_seg, k_seg):
        seg = {}
        if self.has_segments:
            seg = dict(q_segment=q_seg[:, None], k_segment=k_seg[None, :])
        ok = visible(q_pos[:, None], k_pos[None, :], causal=self.causal, sliding_window=None,
                     **seg)
        if self.padded_kv_len != self.kv_len:
            ok &= k_pos[None, :] < self.kv_len
        return ok


def _dot(a, b, contract):
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           preferred_element_type=jnp.float32)


def _segment_refs(refs, n_in, cfg):
    """(inputs, q ids ref, kv ids ref, outputs): segment refs follow the inputs."""
    seg = refs[n_in:n_in + 2] if cfg.has_segments else (None, None)
    return refs[:n_in], *seg, refs[n_in + (2 if cfg.has_segments else 0):]


def _kv_tile(k_ref, v_ref, ks_ref, j, cfg):
    """K, V and kv segment ids of key block j (whole-sequence refs)."""
    start = pl.multiple_of(j * cfg.block_k, cfg.block_k)
    rows = pl.ds(start, cfg.block_k)
    return k_ref[rows, :], v_ref[rows, :], ks_ref[rows] if cfg.has_segments else None


def _fwd_kernel(*refs, cfg: _Config):
    (idx_ref, cnt_ref, q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = \
        _segment_refs(refs, 5, cfg)
    q = q_ref[...]
    q_pos = cfg.q_positions(pl.program_id(2))
    q_seg = qs_ref[...] if cfg.has_segments else None

    def step(n, carry):
        m, l, acc = carry
        j = idx_ref[n]
        k, v, k_seg = _kv_tile(k_ref, v_ref, ks_ref, j, cfg)
        s = _dot(q, k, (1, 1)) * cfg.scale
        s = jnp.where(cfg.mask(q_pos, cfg.k_positions(j), q_seg, k_seg), s, -jnp.inf)
        m, l, p, alpha = online_softmax(m, l, s)
        return m, l, acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))

    rows = q.shape[0]
    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(0, cnt_ref[0], step, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _dlogits(q, k, v, do, lse, delta, mask, cfg):
    """Recomputed probabilities P and dL/d(scaled logits) of one tile."""
    s = jnp.where(mask, _dot(q, k, (1, 1)) * cfg.scale, -jnp.inf)
    p = jnp.exp(s - lse[:, None])  # lse is +inf on empty rows: p = 0 there
    return p, p * (_dot(do, v, (1, 1)) - delta[:, None])


def _dq_kernel(*refs, cfg: _Config):
    (idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, \
        (dq_ref,) = _segment_refs(refs, 8, cfg)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = cfg.q_positions(pl.program_id(2))
    q_seg = qs_ref[...] if cfg.has_segments else None

    def step(n, dq):
        j = idx_ref[n]
        k, v, k_seg = _kv_tile(k_ref, v_ref, ks_ref, j, cfg)
        mask = cfg.mask(q_pos, cfg.k_positions(j), q_seg, k_seg)
        _, ds = _dlogits(q, k, v, do, lse, delta, mask, cfg)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = lax.fori_loop(0, cnt_ref[0], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Config):
    (offs_ref, rows_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, \
        (dk_ref, dv_ref) = _segment_refs(refs, 8, cfg)
    bq = cfg.block_q
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_pos = cfg.k_positions(j)
    k_seg = ks_ref[...] if cfg.has_segments else None
    shared = cfg.list_group > 1  # one list row for the whole group

    def head(g, carry):  # one query head of this kv head's group
        row = 0 if shared else g

        def step(t, carry):
            dk, dv = carry
            i = rows_ref[row, t]
            rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            q_seg = qs_ref[rows] if cfg.has_segments else None
            p, ds = _dlogits(q, k, v, do, lse_ref[g, rows], delta_ref[g, rows],
                             cfg.mask(cfg.q_positions(i), k_pos, q_seg, k_seg), cfg)
            return (dk + _dot(ds.astype(q.dtype), q, (0, 0)),
                    dv + _dot(p.astype(do.dtype), do, (0, 0)))
        return lax.fori_loop(offs_ref[row, j], offs_ref[row, j + 1], step, carry)

    dk, dv = lax.fori_loop(0, cfg.group, head, (jnp.zeros(k.shape, jnp.float32),) * 2)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(cfg: _Config, head_dim: int):
    """Triton launch settings (None interpreted): 8 warps for wide heads."""
    warps = 4 if head_dim <= 64 else 8
    return None if cfg.interpret else compat.triton_compiler_params(num_warps=warps,
                                                                    num_stages=2)


def _query_parallel(kernel, name, inputs, row_inputs, out_shape, lists, segs, cfg):
    """pallas_call over (batch, query head, query block) of a kernel reading
    list row (b, h // list_group, i): ``inputs`` are tiled by query block
    ([B,Sp,H,D] arrays), ``row_inputs`` are [B,H,Sp] row vectors; K and V
    arrive whole. Outputs: ``out_shape`` entries shaped as q, then [B,H,Sp]."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    B, Sp, H, D = q.shape
    Tp = k.shape[1]
    bq, G, LG = cfg.block_q, cfg.group, cfg.list_group
    M = lists[0].shape[-1]
    q_tile = pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0))
    kv_whole = pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, lax.div(h, G), 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    seg_specs = [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                 pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0))] if segs else []
    in_specs = [pl.BlockSpec((None, None, None, M), lambda b, h, i: (b, lax.div(h, LG), i, 0)),
                pl.BlockSpec((None, None, 1), lambda b, h, i: (b, lax.div(h, LG), i)),
                q_tile, kv_whole, kv_whole, *[q_tile] * (len(inputs) - 3),
                *[row_tile] * len(row_inputs), *seg_specs]
    out_specs = [q_tile if o.shape == q.shape else row_tile for o in out_shape]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=(B, H, Sp // bq),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg, D), name=name,
    )(*lists, *inputs, *row_inputs, *segs)


def forward(q, k, v, lists, segs, cfg: _Config):
    """Padded inputs -> (out [B,Sp,H,D], lse [B,H,Sp] float32, -inf on empty rows)."""
    B, Sp, H, _ = q.shape
    return _query_parallel(_fwd_kernel, "block_sparse_attention_fwd", (q, k, v), (),
                           [jax.ShapeDtypeStruct(q.shape, q.dtype),
                            jax.ShapeDtypeStruct((B, H, Sp), jnp.float32)], lists, segs, cfg)


def backward(q, k, v, lists, segs, out, lse, do, cfg: _Config):
    """dq, dk, dv of the padded inputs (lse as ``forward`` gives it)."""
    B, Sp, H, D = q.shape
    Tp, KH = k.shape[1], k.shape[2]
    bk, G, LG = cfg.block_k, cfg.group, cfg.list_group
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # empty rows: exp(s - lse) = 0
    (dq,) = _query_parallel(_dq_kernel, "block_sparse_attention_dq", (q, k, v, do),
                            (lse, delta), [jax.ShapeDtypeStruct(q.shape, q.dtype)],
                            lists, segs, cfg)

    offsets, rows, _ = transposed_lists(*lists, Tp // bk)
    rows_per_program = 1 if LG > 1 else G  # list rows a kv head's program reads
    q_group = pl.BlockSpec((None, Sp, G, D), lambda b, kh, j: (b, 0, kh, 0))
    vec_group = pl.BlockSpec((None, G, Sp), lambda b, kh, j: (b, kh, 0))
    kv_tile = pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0))
    seg_specs = [pl.BlockSpec((None, Sp), lambda b, kh, j: (b, 0)),
                 pl.BlockSpec((None, bk), lambda b, kh, j: (b, j))] if segs else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg), grid=(B, KH, Tp // bk),
        in_specs=[pl.BlockSpec((None, rows_per_program, offsets.shape[-1]),
                               lambda b, kh, j: (b, kh, 0)),
                  pl.BlockSpec((None, rows_per_program, rows.shape[-1]),
                               lambda b, kh, j: (b, kh, 0)),
                  q_group, kv_tile, kv_tile, q_group, vec_group, vec_group, *seg_specs],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg, D),
        name="block_sparse_attention_dkdv",
    )(offsets, rows, q, k, v, do, lse, delta, *segs)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, lists, segs, cfg):
    return forward(q, k, v, lists, segs, cfg)[0]


def _attention_fwd(q, k, v, lists, segs, cfg):
    out, lse = forward(q, k, v, lists, segs, cfg)
    return out, (q, k, v, lists, segs, out, lse)


def _attention_bwd(cfg, residuals, do):
    q, k, v, lists, segs, out, lse = residuals
    dq, dk, dv = backward(q, k, v, lists, segs, out, lse, do, cfg)
    no_grad = lambda xs: tuple(None for _ in xs)  # noqa: E731 - integer inputs
    return dq, dk, dv, no_grad(lists), no_grad(segs)


_attention.defvjp(_attention_fwd, _attention_bwd)


def prepare(q, k, v, segment_ids, *, block_q, block_k, causal, softmax_scale, list_heads,
            interpret):
    """q, k, v (and segment ids) zero-padded to whole blocks and a power-of-two
    head_dim >= 16, with the call's config."""
    B, S, H, D = q.shape
    T, KH = k.shape[1], k.shape[2]
    Sp, Tp = pl.cdiv(S, block_q) * block_q, pl.cdiv(T, block_k) * block_k
    Dp = max(MIN_BLOCK, pl.next_power_of_2(D))  # zero columns change no dot product
    cfg = _Config(q_len=S, kv_len=T, padded_kv_len=Tp, group=H // KH,
                  list_group=H // list_heads, causal=causal,
                  has_segments=segment_ids is not None,
                  scale=D ** -0.5 if softmax_scale is None else float(softmax_scale),
                  block_q=block_q, block_k=block_k, interpret=interpret)
    segs = () if segment_ids is None else (pad_to(segment_ids[0], (B, Sp)),
                                           pad_to(segment_ids[1], (B, Tp)))
    return (pad_to(q, (B, Sp, H, Dp)), pad_to(k, (B, Tp, KH, Dp)), pad_to(v, (B, Tp, KH, Dp)),
            segs, cfg)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "softmax_scale",
                                             "interpret"))
def blockspec_block_sparse_attention(q, k, v, block_indices, block_counts, segment_ids=None, *,
                                     block_q, block_k, causal=False, softmax_scale=None,
                                     interpret=False):
    """Differentiable block-sparse attention by the portable kernels.

    Arguments as checked by api.block_sparse_attention: lists in canonical
    form (lists.canonical_lists), segment ids None or an int32 pair."""
    q_p, k_p, v_p, segs, cfg = prepare(q, k, v, segment_ids, block_q=block_q, block_k=block_k,
                                       causal=causal, softmax_scale=softmax_scale,
                                       list_heads=block_indices.shape[1], interpret=interpret)
    out = _attention(q_p, k_p, v_p, (block_indices, block_counts), segs, cfg)
    return out[:, :q.shape[1], :, :q.shape[3]]
