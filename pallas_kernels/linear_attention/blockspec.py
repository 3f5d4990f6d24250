"""Chunked gated linear attention in BlockSpec-style Pallas, forward and
backward, for a per-head (scalar) decay.

Runs interpreted on CPU and compiles through Pallas's Triton lowering on an
NVIDIA GPU. Four kernels, two of them sequential over chunks and two
parallel (the chunk math is chunked.py's; docs/design/linear-attention.md):

  states   grid (B, H, value tiles): walks the chunks in order carrying the
           [Dk, bv] state in registers, storing the state entering each chunk;
  outputs  grid (B, H, chunks): o = scale * ((q * exp(b)) h_n + masked scores v);
  dstates  grid (B, H, value tiles): walks the chunks backwards carrying
           dL/dh, storing dL/dh_{n+1} for chunk n and returning dL/dh_0;
  grads    grid (B, H, chunks): dq, dk, dv of one chunk.

The decay's gradient needs no kernel: with B_t the log decay summed from the
start, the outputs depend on it through q_t exp(B_t) and k_s exp(-B_s), so
dL/dB_t = sum(q_t dq_t - k_t dk_t) (plus the final state's own term), and
dL/dlog_decay_t is that summed over positions >= t.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.linear_attention.chunked import causal_exponent
from pallas_kernels.shapes import pad_to, round_up

MIN_BLOCK = 16  # smallest tile a GPU matrix instruction takes
_BLOCK_V = 64   # value columns of the state one sequential program carries


@dataclasses.dataclass(frozen=True)
class _Config:
    chunk: int
    chunks: int
    scale: float
    block_v: int
    interpret: bool


def _dot(a, b, contract):
    """a @ b over the given (a_dim, b_dim) pair, accumulated in float32."""
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           preferred_element_type=jnp.float32)


def _last(b, chunk):
    """b[chunk - 1] of a [chunk] vector, as a reduction (Triton takes no
    element indexing of a loaded block)."""
    return jnp.sum(jnp.where(lax.iota(jnp.int32, chunk) == chunk - 1, b, 0.0))


def _scaled_rows(x, factor, dtype):
    """x * factor[:, None] in float32, cast to the matmul operand dtype."""
    return (x.astype(jnp.float32) * factor[:, None]).astype(dtype)


def _states_kernel(k_ref, v_ref, b_ref, h0_ref, states_ref, final_ref, *, cfg: _Config):
    C = cfg.chunk

    def step(n, h):
        start = pl.multiple_of(n * C, C)
        states_ref[n] = h
        k = k_ref[pl.ds(start, C), :]
        b = b_ref[pl.ds(start, C)]
        b_last = _last(b, C)
        k_decayed = _scaled_rows(k, jnp.exp(b_last - b), k.dtype)
        return h * jnp.exp(b_last) + _dot(k_decayed, v_ref[pl.ds(start, C), :], (0, 0))

    final_ref[...] = lax.fori_loop(0, cfg.chunks, step, h0_ref[...].astype(jnp.float32))


def _dstates_kernel(q_ref, do_ref, b_ref, dfinal_ref, dstates_ref, dinit_ref, *, cfg: _Config):
    C = cfg.chunk

    def step(i, dh):
        n = cfg.chunks - 1 - i
        start = pl.multiple_of(n * C, C)
        dstates_ref[n] = dh  # dL/dh_{n+1}, what chunk n's state update reads
        q = q_ref[pl.ds(start, C), :]
        b = b_ref[pl.ds(start, C)]
        q_decayed = _scaled_rows(q, cfg.scale * jnp.exp(b), q.dtype)
        return dh * jnp.exp(_last(b, C)) + _dot(q_decayed, do_ref[pl.ds(start, C), :], (0, 0))

    dinit_ref[...] = lax.fori_loop(0, cfg.chunks, step, dfinal_ref[...].astype(jnp.float32))


def _outputs_kernel(q_ref, k_ref, v_ref, b_ref, h_ref, o_ref, *, cfg: _Config):
    q, k, v, b = q_ref[...], k_ref[...], v_ref[...], b_ref[...]
    scores = _dot(q, k, (1, 1)) * (cfg.scale * causal_exponent(b, b))
    q_decayed = _scaled_rows(q, cfg.scale * jnp.exp(b), q.dtype)
    out = _dot(scores.astype(v.dtype), v, (1, 0)) + _dot(q_decayed, h_ref[...].astype(q.dtype),
                                                         (1, 0))
    o_ref[...] = out.astype(o_ref.dtype)


def _grads_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, h_ref, dh_ref, dq_ref, dk_ref, dv_ref, *,
                  cfg: _Config):
    q, k, v, b, do = q_ref[...], k_ref[...], v_ref[...], b_ref[...], do_ref[...]
    h, dh = h_ref[...].astype(q.dtype), dh_ref[...].astype(q.dtype)
    mask = cfg.scale * causal_exponent(b, b)
    scores = _dot(q, k, (1, 1)) * mask
    dscores = (_dot(do, v, (1, 1)) * mask).astype(q.dtype)
    key_decay = jnp.exp(_last(b, cfg.chunk) - b)
    dq = _dot(dscores, k, (1, 0)) + (cfg.scale * jnp.exp(b))[:, None] * _dot(do, h, (1, 1))
    dk = _dot(dscores, q, (0, 0)) + key_decay[:, None] * _dot(v, dh, (1, 1))
    dv = (_dot(scores.astype(do.dtype), do, (0, 0))
          + _dot(_scaled_rows(k, key_decay, k.dtype), dh, (1, 0)))
    dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv.astype(dv_ref.dtype)


def _params(cfg: _Config):
    return None if cfg.interpret else compat.triton_compiler_params(num_warps=4, num_stages=2)


def _sequential_call(kernel, name, cfg: _Config, rows, columns, b, state):
    """A kernel walking the chunks of each (batch, head, value tile): rows
    [B,Sp,H,Dk] (k or q) whole, columns [B,Sp,H,Dv] (v or dO) and a
    [B,H,Dk,Dv] state by value tiles, b [B,H,Sp] whole -> (one [Dk, Dv]
    float32 state per chunk [B,H,N,Dk,Dv], one [B,H,Dk,Dv] float32 state)."""
    B, Sp, H, Dk = rows.shape
    Dv, N, bv = columns.shape[-1], cfg.chunks, cfg.block_v
    state_tile = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j: (b, h, 0, j))
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=(B, H, Dv // bv),
        in_specs=[pl.BlockSpec((None, Sp, None, Dk), lambda b, h, j: (b, 0, h, 0)),
                  pl.BlockSpec((None, Sp, None, bv), lambda b, h, j: (b, 0, h, j)),
                  pl.BlockSpec((None, None, Sp), lambda b, h, j: (b, h, 0)), state_tile],
        out_specs=[pl.BlockSpec((None, None, N, Dk, bv), lambda b, h, j: (b, h, 0, 0, j)),
                   state_tile],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, Dk, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        interpret=cfg.interpret, compiler_params=_params(cfg), name=name,
    )(rows, columns, b, state)


def _chunk_specs(Dk, Dv, C):
    """(a [C, Dk] chunk, a [C, Dv] chunk, its b, its [Dk, Dv] state) for the
    grid (B, H, chunks)."""
    return (pl.BlockSpec((None, C, None, Dk), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None, Dv), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, None, C), lambda b, h, n: (b, h, n)),
            pl.BlockSpec((None, None, None, Dk, Dv), lambda b, h, n: (b, h, n, 0, 0)))


def _chunk_cumsum(g, chunk):
    """Cumulative log decay within each chunk, [B, H, Sp] float32."""
    B, H, Sp = g.shape
    return jnp.cumsum(g.reshape(B, H, Sp // chunk, chunk), axis=-1).reshape(B, H, Sp)


def _forward(q, k, v, g, h0, cfg: _Config):
    """Padded q, k [B,Sp,H,Dk], v [B,Sp,H,Dv], g [B,H,Sp] float32, h0 -> (out,
    states entering each chunk, final state, within-chunk cumulative decay)."""
    B, Sp, H, Dk = q.shape
    Dv, C, N = v.shape[-1], cfg.chunk, cfg.chunks
    b = _chunk_cumsum(g, C)
    states, final = _sequential_call(_states_kernel, "linear_attention_states", cfg, k, v, b, h0)
    k_chunk, v_chunk, b_chunk, state = _chunk_specs(Dk, Dv, C)
    out = pl.pallas_call(
        functools.partial(_outputs_kernel, cfg=cfg), grid=(B, H, N),
        in_specs=[k_chunk, k_chunk, v_chunk, b_chunk, state], out_specs=v_chunk,
        out_shape=jax.ShapeDtypeStruct((B, Sp, H, Dv), q.dtype), interpret=cfg.interpret,
        compiler_params=_params(cfg), name="linear_attention_outputs",
    )(q, k, v, b, states)
    return out, states, final, b


def _backward(q, k, v, b, states, do, dfinal, cfg: _Config):
    """-> (dq, dk float32, dv, dL/dh_0)."""
    B, Sp, H, Dk = q.shape
    Dv, C, N = v.shape[-1], cfg.chunk, cfg.chunks
    dstates, dinit = _sequential_call(_dstates_kernel, "linear_attention_dstates", cfg, q, do, b,
                                      dfinal)
    k_chunk, v_chunk, b_chunk, state = _chunk_specs(Dk, Dv, C)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_grads_kernel, cfg=cfg), grid=(B, H, N),
        in_specs=[k_chunk, k_chunk, v_chunk, b_chunk, v_chunk, state, state],
        out_specs=[k_chunk, k_chunk, v_chunk],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct(k.shape, jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=_params(cfg), name="linear_attention_grads",
    )(q, k, v, b, do, states, dstates)
    return dq, dk, dv, dinit


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear_attention(q, k, v, g, h0, cfg):
    out, _, final, _ = _forward(q, k, v, g, h0, cfg)
    return out, final


def _linear_attention_fwd(q, k, v, g, h0, cfg):
    out, states, final, b = _forward(q, k, v, g, h0, cfg)
    return (out, final), (q, k, v, b, states, final)


def _linear_attention_bwd(cfg, residuals, cotangents):
    q, k, v, b, states, final = residuals
    do, dfinal = cotangents
    dq, dk, dv, dinit = _backward(q, k, v, b, states, do.astype(q.dtype), dfinal, cfg)
    d_cumulative = jnp.einsum("bshk,bshk->bhs", q.astype(jnp.float32), dq) - jnp.einsum(
        "bshk,bshk->bhs", k.astype(jnp.float32), dk)
    dg = lax.cumsum(d_cumulative, axis=2, reverse=True)
    dg = dg + jnp.sum(dfinal * final, axis=(2, 3))[..., None]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg, dinit


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def fit_chunk(chunk: int, length: int) -> int:
    """The chunk shrunk to the smallest power of two (>= 16) covering the sequence."""
    return min(chunk, max(MIN_BLOCK, pl.next_power_of_2(length)))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "interpret"))
def blockspec_linear_attention(q, k, v, log_decay, initial_state=None, *, scale, chunk,
                               interpret=False):
    """Differentiable gated linear attention with a per-head decay.

    q, k [B,S,H,Dk], v [B,S,H,Dv], log_decay [B,S,H], initial_state
    [B,H,Dk,Dv] or None, checked as api.linear_attention does; chunk a power
    of two >= 16. -> (out [B,S,H,Dv] in q.dtype, final state float32).
    interpret=True runs on CPU; False compiles for a GPU through Triton.
    """
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    C = fit_chunk(chunk, S)
    Sp = round_up(S, C)
    Dkp, Dvp = (max(MIN_BLOCK, pl.next_power_of_2(d)) for d in (Dk, Dv))
    cfg = _Config(chunk=C, chunks=Sp // C, scale=float(scale), block_v=min(Dvp, _BLOCK_V),
                  interpret=interpret)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, Dk, Dv), jnp.float32)
    # Zero padding: padded key columns add nothing to any product, and padded
    # tokens (k = 0, log decay 0) leave the state as it is.
    g = jnp.moveaxis(pad_to(log_decay.astype(jnp.float32), (B, Sp, H)), 1, 2)
    out, final = _linear_attention(pad_to(q, (B, Sp, H, Dkp)), pad_to(k, (B, Sp, H, Dkp)),
                                   pad_to(v, (B, Sp, H, Dvp)), g,
                                   pad_to(initial_state.astype(jnp.float32), (B, H, Dkp, Dvp)),
                                   cfg)
    return out[:, :S, :, :Dv], final[:, :, :Dk, :Dv]
