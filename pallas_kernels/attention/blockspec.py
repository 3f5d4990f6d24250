"""Portable flash attention in BlockSpec-style Pallas, forward and backward.

Runs interpreted on CPU and compiles through Pallas's Triton lowering on any
NVIDIA GPU. The S x T logits never exist in memory: each program owns one
block of query rows (forward, dq) or one block of keys (dk/dv) and walks the
other axis in tiles with an online softmax. Only tiles that the causal or
sliding-window mask can reach are visited. The backward pass is
FlashAttention-2's: it recomputes the probabilities from the saved logsumexp
and uses delta = rowsum(dO * O).

Grouped-query attention: the BlockSpec index maps send query head h to kv head
h // group, and the dk/dv kernel loops over the group's query heads, so k and
v are never repeated in memory.
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
from pallas_kernels.shapes import pad_to, round_up

_MIN_BLOCK = 16  # smallest tile a GPU matrix instruction takes


@dataclasses.dataclass(frozen=True)
class PortableBlockSizes:
    """Tile sizes of the portable kernel (powers of two, at least 16) and GPU
    launch settings; the Mosaic GPU kernels' are ``tuning.MosaicBlockSizes``.

    block_q/block_kv tile the forward pass; block_q_bwd/block_kv_bwd both
    backward kernels. Blocks larger than a sequence shrink to fit it; when none
    are given, PortableBlockSizes.for_head_dim picks them. num_warps None picks
    4 for head_dim <= 64 and 8 above; num_warps and num_stages matter only
    when compiled for a GPU.
    """
    block_q: int = 64
    block_kv: int = 64
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "PortableBlockSizes":
        """Defaults: wide heads get narrower tiles so accumulators stay in registers."""
        if head_dim <= 128:
            return cls()
        return cls(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=32)

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < _MIN_BLOCK or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {size!r}")
        if self.num_warps is not None and (self.num_warps < 1 or self.num_warps & (self.num_warps - 1)):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps!r}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages!r}")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call: shapes before padding, mask, tiling."""
    q_len: int
    kv_len: int
    padded_kv_len: int
    group: int
    causal: bool
    window: int | None
    has_segments: bool
    softcap: float | None
    scale: float
    blocks: PortableBlockSizes
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """The mask seen at tile granularity, for one pass's tile sizes."""
    cfg: _Config
    block_q: int
    block_kv: int

    @property
    def offset(self):
        return self.cfg.kv_len - self.cfg.q_len  # bottom-right alignment, see mask.py

    def q_positions(self, q_block):
        return q_block * self.block_q + lax.iota(jnp.int32, self.block_q) + self.offset

    def k_positions(self, start):
        return start + lax.iota(jnp.int32, self.block_kv)

    def visible(self, q_pos, k_pos, q_seg, k_seg):
        has_seg = self.cfg.has_segments
        ok = visible(q_pos[:, None], k_pos[None, :], causal=self.cfg.causal,
                     sliding_window=self.cfg.window,
                     q_segment=q_seg[:, None] if has_seg else None,
                     k_segment=k_seg[None, :] if has_seg else None)
        if self.cfg.padded_kv_len != self.cfg.kv_len:
            ok &= k_pos[None, :] < self.cfg.kv_len
        return ok

    def kv_block_range(self, q_block):
        """[lo, hi) of the key tiles that query tile q_block can see."""
        first_q = q_block * self.block_q + self.offset
        last_q = first_q + self.block_q - 1
        lo = jnp.int32(0)
        hi = jnp.int32(pl.cdiv(self.cfg.kv_len, self.block_kv))
        w = self.cfg.window
        if self.cfg.causal:
            hi = jnp.minimum(hi, _ceil_div(last_q + 1, self.block_kv))
        if w is not None:
            lo = _floor_div(first_q - w + 1, self.block_kv)
            if not self.cfg.causal:
                hi = jnp.minimum(hi, _ceil_div(last_q + w, self.block_kv))
        return lo, hi

    def q_block_range(self, kv_block):
        """[lo, hi) of the query tiles that can see key tile kv_block."""
        first_k = kv_block * self.block_kv
        last_k = first_k + self.block_kv - 1
        lo = jnp.int32(0)
        hi = jnp.int32(pl.cdiv(self.cfg.q_len, self.block_q))
        w = self.cfg.window
        if self.cfg.causal:
            lo = _floor_div(first_k - self.offset, self.block_q)
        if w is not None:
            hi = jnp.minimum(hi, _ceil_div(last_k + w - self.offset, self.block_q))
            if not self.cfg.causal:
                lo = _floor_div(first_k - w + 1 - self.offset, self.block_q)
        return lo, hi


def _floor_div(x, d):
    """floor(x / d) for x clamped at 0: a tile index that cannot go negative."""
    return lax.div(jnp.maximum(x, 0), d)


def _ceil_div(x, d):
    return lax.div(jnp.maximum(x, 0) + d - 1, d)


def _dot(a, b, contract):
    """a @ b over the given (a_dim, b_dim) pair, accumulated in float32."""
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           preferred_element_type=jnp.float32)


def _logits(q, k, cfg):
    """Scaled (and soft-capped) q k^T in float32, plus tanh for the capped gradient."""
    s = _dot(q, k, (1, 1)) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


def _split_refs(refs, n_in, has_segments):
    """(inputs, q_seg_ref, kv_seg_ref, outputs): segment refs follow the inputs."""
    q_seg, kv_seg = refs[n_in:n_in + 2] if has_segments else (None, None)
    return refs[:n_in], q_seg, kv_seg, refs[n_in + (2 if has_segments else 0):]


def _fwd_kernel(*refs, cfg: _Config):
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split_refs(refs, 3, cfg.has_segments)
    tiles = _Tiling(cfg, cfg.blocks.block_q, cfg.blocks.block_kv)
    bq, bk = tiles.block_q, tiles.block_kv
    q_block = pl.program_id(2)
    q = q_ref[...]
    q_pos = tiles.q_positions(q_block)
    q_seg = qs_ref[...] if cfg.has_segments else None

    def step(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        k_seg = ks_ref[pl.ds(start, bk)] if cfg.has_segments else None
        s, _ = _logits(q, k, cfg)
        s = jnp.where(tiles.visible(q_pos, tiles.k_positions(start), q_seg, k_seg), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp gives 0, not NaN.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_shift[:, None])
        alpha = jnp.exp(m - m_shift)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return m_new, l, acc

    lo, hi = tiles.kv_block_range(q_block)
    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(lo, hi, step, init)
    empty = l == 0.0  # fully masked rows: zero output, logsumexp -inf
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _probs_and_dlogits(q, k, v, do, lse, delta, mask, cfg):
    """Recomputed probabilities P and dL/d(raw scaled logits) for one tile."""
    s, t = _logits(q, k, cfg)
    s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - lse[:, None])  # lse is +inf on empty rows, so p = 0 there
    dp = _dot(do, v, (1, 1))
    ds = p * (dp - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dq_kernel(*refs, cfg: _Config):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dq_ref,) = \
        _split_refs(refs, 6, cfg.has_segments)
    tiles = _Tiling(cfg, cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd)
    bk = tiles.block_kv
    q_block = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = tiles.q_positions(q_block)
    q_seg = qs_ref[...] if cfg.has_segments else None

    def step(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        k_seg = ks_ref[pl.ds(start, bk)] if cfg.has_segments else None
        mask = tiles.visible(q_pos, tiles.k_positions(start), q_seg, k_seg)
        _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, mask, cfg)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    lo, hi = tiles.kv_block_range(q_block)
    dq = lax.fori_loop(lo, hi, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Config):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dk_ref, dv_ref) = \
        _split_refs(refs, 6, cfg.has_segments)
    tiles = _Tiling(cfg, cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd)
    bq = tiles.block_q
    kv_block = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_pos = tiles.k_positions(kv_block * tiles.block_kv)
    k_seg = ks_ref[...] if cfg.has_segments else None
    lo, hi = tiles.q_block_range(kv_block)

    def head(g, carry):  # one query head of this kv head's group
        def step(i, carry):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = q_ref[pl.ds(start, bq), g, :]
            do = do_ref[pl.ds(start, bq), g, :]
            lse = lse_ref[g, pl.ds(start, bq)]
            delta = delta_ref[g, pl.ds(start, bq)]
            q_seg = qs_ref[pl.ds(start, bq)] if cfg.has_segments else None
            mask = tiles.visible(tiles.q_positions(i), k_pos, q_seg, k_seg)
            p, ds = _probs_and_dlogits(q, k, v, do, lse, delta, mask, cfg)
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
            return dk, dv
        return lax.fori_loop(lo, hi, step, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(cfg: _Config, head_dim: int):
    if cfg.interpret:
        return None
    warps = cfg.blocks.num_warps or (4 if head_dim <= 64 else 8)
    return compat.triton_compiler_params(num_warps=warps, num_stages=cfg.blocks.num_stages)


def _ids_tile(block):
    """BlockSpec for one tile of a [B, L] segment-id array, tiled by the grid's last axis."""
    return pl.BlockSpec((None, block), lambda b, h, i: (b, i))


def _ids_whole(length):
    """BlockSpec for a whole row of a [B, L] segment-id array."""
    return pl.BlockSpec((None, length), lambda b, h, i: (b, 0))


def _forward(q, k, v, segs, cfg: _Config):
    """Padded inputs -> (out [B,Sp,H,D], lse [B,H,Sp] float32)."""
    B, Sp, H, D = q.shape
    Tp = k.shape[1]
    bq, G = cfg.blocks.block_q, cfg.group
    q_spec = pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, lax.div(h, G), 0))
    segs_specs = [_ids_tile(bq), _ids_whole(Tp)] if segs else []
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(B, H, Sp // bq),
        in_specs=[q_spec, kv_spec, kv_spec, *segs_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Sp), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, D),
        name="flash_attention_fwd",
    )(q, k, v, *segs)


def _backward(q, k, v, segs, out, lse, do, cfg: _Config):
    B, Sp, H, D = q.shape
    Tp, KH = k.shape[1], k.shape[2]
    bq, bk, G = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd, cfg.group
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # empty rows: exp(s - lse) = 0
    params = _compiler_params(cfg, D)

    q_tile = pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0))
    kv_whole = pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, lax.div(h, G), 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, H, Sp // bq),
        in_specs=[q_tile, kv_whole, kv_whole, q_tile, row_tile, row_tile,
                  *([_ids_tile(bq), _ids_whole(Tp)] if segs else [])],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret, compiler_params=params, name="flash_attention_dq",
    )(q, k, v, do, lse, delta, *segs)

    # Grid over kv heads: each program sees the whole group of G query heads.
    q_group = pl.BlockSpec((None, Sp, G, D), lambda b, kh, j: (b, 0, kh, 0))
    rows_group = pl.BlockSpec((None, G, Sp), lambda b, kh, j: (b, kh, 0))
    kv_tile = pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(B, KH, Tp // bk),
        in_specs=[q_group, kv_tile, kv_tile, q_group, rows_group, rows_group,
                  *([_ids_whole(Sp), _ids_tile(bk)] if segs else [])],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=params, name="flash_attention_dkdv",
    )(q, k, v, do, lse, delta, *segs)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segs, cfg):
    return _forward(q, k, v, segs, cfg)[0]


def _attention_fwd(q, k, v, segs, cfg):
    out, lse = _forward(q, k, v, segs, cfg)
    return out, (q, k, v, segs, out, lse)


def _attention_bwd(cfg, residuals, do):
    q, k, v, segs, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, segs, out, lse, do, cfg)
    return dq, dk, dv, tuple(None for _ in segs)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _fit_block(block, length):
    """Shrink a tile to the smallest power of two (>= 16) covering the sequence."""
    return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _prepare(q, k, v, segment_ids, *, causal, sliding_window, logit_softcap, scale,
             block_sizes, interpret):
    """Pads q/k/v (and segment ids) to whole tiles; returns them with the config."""
    B, S, H, D = q.shape
    T, KH = k.shape[1], k.shape[2]
    bs = block_sizes or PortableBlockSizes.for_head_dim(D)
    bs = dataclasses.replace(bs, block_q=_fit_block(bs.block_q, S), block_kv=_fit_block(bs.block_kv, T),
                             block_q_bwd=_fit_block(bs.block_q_bwd, S),
                             block_kv_bwd=_fit_block(bs.block_kv_bwd, T))
    Sp = round_up(S, max(bs.block_q, bs.block_q_bwd))
    Tp = round_up(T, max(bs.block_kv, bs.block_kv_bwd))
    Dp = max(_MIN_BLOCK, pl.next_power_of_2(D))  # zero columns change no dot product
    cfg = _Config(q_len=S, kv_len=T, padded_kv_len=Tp, group=H // KH,
                  causal=causal, window=sliding_window, has_segments=segment_ids is not None,
                  softcap=logit_softcap, scale=D ** -0.5 if scale is None else float(scale),
                  blocks=bs, interpret=interpret)
    q = pad_to(q, (B, Sp, H, Dp))
    k = pad_to(k, (B, Tp, KH, Dp))
    v = pad_to(v, (B, Tp, KH, Dp))
    segs = () if segment_ids is None else (pad_to(segment_ids[0], (B, Sp)),
                                           pad_to(segment_ids[1], (B, Tp)))
    return q, k, v, segs, cfg


_STATIC = ("causal", "sliding_window", "logit_softcap", "scale", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def blockspec_attention_with_lse(q, k, v, segment_ids=None, *, causal=False, sliding_window=None,
                                 logit_softcap=None, scale=None, block_sizes=None, interpret=False):
    """Forward only: (out [B,S,H,D], logsumexp [B,H,S] float32, -inf on empty rows).

    Arguments as for blockspec_flash_attention; not differentiable.
    """
    q_p, k_p, v_p, segs, cfg = _prepare(q, k, v, segment_ids, causal=causal,
                                        sliding_window=sliding_window, logit_softcap=logit_softcap,
                                        scale=scale, block_sizes=block_sizes, interpret=interpret)
    out, lse = _forward(q_p, k_p, v_p, segs, cfg)
    S, D = q.shape[1], q.shape[3]
    return out[:, :S, :, :D], lse[:, :, :S]


@functools.partial(jax.jit, static_argnames=_STATIC)
def blockspec_flash_attention(q, k, v, segment_ids=None, *, causal=False, sliding_window=None,
                              logit_softcap=None, scale=None, block_sizes=None, interpret=False):
    """Differentiable flash attention, q [B,S,H,D], k/v [B,T,KH,D] -> [B,S,H,D].

    Inputs must already be checked and segment ids normalized to a pair
    (int32 [B,S], [B,T]) as pallas_kernels.attention.api.flash_attention does.
    interpret=True runs on CPU; False compiles for a GPU through Triton.
    """
    q_p, k_p, v_p, segs, cfg = _prepare(q, k, v, segment_ids, causal=causal,
                                        sliding_window=sliding_window, logit_softcap=logit_softcap,
                                        scale=scale, block_sizes=block_sizes, interpret=interpret)
    out = _attention(q_p, k_p, v_p, segs, cfg)
    return out[:, :q.shape[1], :, :q.shape[3]]
