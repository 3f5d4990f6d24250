"""Gated linear attention with the sequence split over devices (LASP-2).

Called inside jax.shard_map, each device holding one contiguous piece of
the sequence, pieces in the order of the mesh axes named by ``axis_name``.
The state recurrence is linear, so a piece's outputs are those computed
from a zero initial state plus the state entering the piece carried through
its own decay:

  1. each device runs linear_attention on its piece from a zero state: its
     outputs o_i, final state S_i and total log decay G_i;
  2. ONE all-gather of the summaries (S_i, G_i) (the decay rides as one
     more value column of the state);
  3. device i combines the prefix  h_i = sum_{j<i} exp(G_{j+1} + ... +
     G_{i-1}) S_j  (plus exp(G_0 + ... + G_{i-1}) times the initial state)
     and adds  scale * (q * exp(cumulative log decay within the piece)) h_i.

Every exponent is a sum of log decays, so <= 0 when they are. The backward
pass is jax's through the all-gather (a reduce-scatter) and the local
kernel's own VJP.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_attention.api import linear_attention


def _carried_state(states, decays, initial_state, upto):
    """The state after pieces [0, upto): sum_{j<upto} exp(sum_{j<m<upto} G_m)
    S_j + exp(sum_{m<upto} G_m) h0. states [P,B,H,Dk,Dv], decays [P,B,H,Dk]."""
    P = states.shape[0]
    j = lax.broadcasted_iota(jnp.int32, (P, P), 0)
    m = lax.broadcasted_iota(jnp.int32, (P, P), 1)
    between = ((j < m) & (m < upto)).astype(jnp.float32)  # [j, m]
    weights = jnp.exp(jnp.einsum("jm,mbhk->jbhk", between, decays))
    weights = jnp.where((jnp.arange(P) < upto)[:, None, None, None], weights, 0.0)
    state = jnp.einsum("jbhk,jbhkv->bhkv", weights, states)
    if initial_state is not None:
        before = jnp.exp(jnp.sum(jnp.where((jnp.arange(P) < upto)[:, None, None, None], decays,
                                           0.0), axis=0))
        state = state + before[..., None] * initial_state.astype(jnp.float32)
    return state


def sequence_parallel_linear_attention(q, k, v, log_decay, initial_state=None, *, axis_name,
                                       scale: float | None = None, chunk_size: int = 64,
                                       implementation: str = "auto",
                                       interpret: bool | None = None):
    """linear_attention (same arguments and results) on this device's piece
    of a sequence split over the mesh axes ``axis_name`` (a name or a tuple
    of names); initial_state is the whole sequence's (the same on every
    device), and the final state returned is the whole sequence's."""
    Dk = q.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    out, state = linear_attention(q, k, v, log_decay, None, scale=scale, chunk_size=chunk_size,
                                  implementation=implementation, interpret=interpret)
    g = log_decay.astype(jnp.float32)
    cumulative = jnp.cumsum(g, axis=1)  # [B, S, H(, Dk)]
    total = cumulative[:, -1]
    total_keys = jnp.broadcast_to(total[..., None] if g.ndim == 3 else total, state.shape[:3])
    summary = jnp.concatenate([state, total_keys[..., None]], axis=-1)
    gathered = lax.all_gather(summary, axis_name)  # [P, B, H, Dk, Dv + 1]
    states, decays = gathered[..., :-1], gathered[..., -1]
    pieces, here = states.shape[0], lax.axis_index(axis_name)
    entering = _carried_state(states, decays, initial_state, here)
    decay = jnp.exp(cumulative[..., None] if g.ndim == 3 else cumulative)
    carried = jnp.einsum("bshk,bhkv->bshv", q.astype(jnp.float32) * decay, entering)
    final = _carried_state(states, decays, initial_state, pieces)
    return (out.astype(jnp.float32) + scale * carried).astype(out.dtype), final
