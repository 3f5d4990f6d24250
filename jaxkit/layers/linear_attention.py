"""Gated linear attention (GLA) token mixer: the layer of model.mixer
'linear'. q, k, v and a data-dependent log decay are projections of x; the
core is pallas_kernels.linear_attention (implementation a config choice);
its output is normalised per head and gated by swish(x W_gate) as in GLA.

No rotary embeddings: the decay orders the tokens. On a mesh whose
'length' axis is split, the core runs sequence-parallel (LASP-2: one
all-gather of per-device state summaries per layer). For generation,
cached() carries each sequence's recurrent state instead of keys and
values."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import LinearAttentionConfig
from jaxkit.layers.linear import Linear
from jaxkit.layers.norm import RMSNorm
from jaxkit.sharding import active, mesh_axes, per_shard
from pallas_kernels.linear_attention import (linear_attention, linear_attention_reference,
                                             sequence_parallel_linear_attention)

# GLA's gate temperature: log_decay = log_sigmoid(x W + b) / 16 keeps the
# decays near 1 (long memory) at initialisation.
DECAY_TEMPERATURE = 16.0


class LinearAttention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, cfg: LinearAttentionConfig,
                 rngs: nnx.Rngs, param_dtype, compute_dtype, norm_eps: float = 1e-6,
                 out_std: float | None = None, quant=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype)
        width = num_heads * head_dim
        self.q = Linear(d_model, width, axes=("embed", "heads"), target="q", quant=quant, **kw)
        self.k = Linear(d_model, width, axes=("embed", "heads"), target="k", quant=quant, **kw)
        self.v = Linear(d_model, width, axes=("embed", "heads"), target="v", quant=quant, **kw)
        self.gate = Linear(d_model, width, axes=("embed", "heads"), **kw)
        decays = num_heads if cfg.decay == "scalar" else width
        self.decay = Linear(d_model, decays, axes=("embed", "heads"), **kw)
        self.decay_bias = nnx.Param(jnp.zeros((decays,), param_dtype), logical_axes=("heads",))
        self.norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
        self.o = Linear(width, d_model, axes=("heads", "embed"), std=out_std, target="o",
                        quant=quant, **kw)
        self.num_heads, self.head_dim, self.cfg = num_heads, head_dim, cfg
        # q|k|v and gate|decay as one Linear each, for generation (jaxkit.generate.fuse)
        self.qkv = nnx.data(None)
        self.gate_decay = nnx.data(None)

    def __call__(self, x, positions=None, segment_ids=None):
        """x [B, S, d_model] -> [B, S, d_model]. positions are not used (the
        decay orders tokens); segment ids are refused: the state would run
        across documents."""
        del positions
        if segment_ids is not None:
            raise ValueError("linear attention takes no segment_ids: its state runs across "
                             "documents (set data.document_mask=false)")
        q, k, v, log_decay, gate = self._project(x)
        return self._output(self._mix(q, k, v, log_decay), gate)

    def cached(self, x, positions, cache, valid, lengths=None, implementation="auto"):
        """The mixer continuing each sequence's recurrent state (cache: an
        object with a float32 state [B, H, Dk, Dv], such as
        jaxkit.generate.StateCache); returns (output, cache).

        Tokens where valid [B, T] is False (a prompt's right padding, the
        token of a finished sequence) get k = 0 and log decay 0, so they
        leave the state exactly as it is. Prefill (lengths None): x holds
        right-padded prompts from position 0, run by the chunked op from
        cache.state; each sequence's state ends at its last valid token.
        Decode (lengths given): x holds each sequence's T newest tokens, run
        through the token-by-token recurrence (one token needs no chunk).
        positions and implementation (decode_attention's) concern softmax
        layers only."""
        del positions, implementation
        if not hasattr(cache, "state"):
            raise ValueError(f"a linear attention layer caches its recurrent state, got a "
                             f"{type(cache).__name__} (jaxkit.generate.model_caches makes one "
                             f"cache per layer of its kind)")
        q, k, v, log_decay, gate = self._project(x)
        k = jnp.where(valid[:, :, None, None], k, 0)
        log_decay = jnp.where(valid.reshape(valid.shape + (1,) * (log_decay.ndim - 2)),
                              log_decay, 0.0)
        if lengths is None:
            # Unsharded: the Engine runs generation without a mesh.
            out, state = linear_attention(q, k, v, log_decay, cache.state,
                                          chunk_size=self.cfg.chunk_size,
                                          implementation=self.cfg.implementation)
        else:
            out, state = linear_attention_reference(q, k, v, log_decay, cache.state)
        return self._output(out, gate), dataclasses.replace(cache, state=state)

    def _project(self, x):
        """q, k, v [B, S, H, D], the log decay, [B, S, H] or [B, S, H, D]
        float32 (model.linear_attention.decay), and the output gate's
        pre-activation [B, S, H * D]."""
        B, S, _ = x.shape
        heads = (B, S, self.num_heads, self.head_dim)
        width = self.num_heads * self.head_dim
        if self.qkv is None:
            q, k, v = (proj(x) for proj in (self.q, self.k, self.v))
        else:
            q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        if self.gate_decay is None:
            gate, decay = self.gate(x), self.decay(x)
        else:
            gate, decay = jnp.split(self.gate_decay(x), [width], axis=-1)
        logits = decay.astype(jnp.float32) + self.decay_bias[...].astype(jnp.float32)
        log_decay = jax.nn.log_sigmoid(logits) / DECAY_TEMPERATURE
        log_decay = log_decay.reshape(heads if self.cfg.decay == "per_key" else heads[:3])
        return q.reshape(heads), k.reshape(heads), v.reshape(heads), log_decay, gate

    def _output(self, out, gate):
        """The core's out [B, S, H, D] normed per head, gated, projected."""
        B, S = out.shape[:2]
        out = self.norm(out) * jax.nn.silu(gate.reshape(out.shape)).astype(out.dtype)
        return self.o(out.reshape(B, S, self.num_heads * self.head_dim))

    def _mix(self, q, k, v, log_decay):
        """The linear-attention core, per shard on a mesh: sequence-parallel
        where the mesh splits 'length', else split over batch and heads."""
        kw = dict(chunk_size=self.cfg.chunk_size, implementation=self.cfg.implementation)
        current = active()
        sequence = () if current is None else mesh_axes("length", current[1], current[0])
        if sequence:
            pieces = math.prod(current[0].shape[axis] for axis in sequence)
            if q.shape[1] % pieces:
                raise ValueError(f"sequence length {q.shape[1]} is not divisible by the {pieces} "
                                 f"devices of mesh axes {sequence} that split it")
            rows = ("batch", "length", "act_heads", None)

            def core(q, k, v, g):
                return sequence_parallel_linear_attention(q, k, v, g, axis_name=sequence, **kw)[0]
        else:
            rows = ("batch", None, "act_heads", None)

            def core(q, k, v, g):
                return linear_attention(q, k, v, g, **kw)[0]
        gates = rows[:log_decay.ndim]
        return per_shard(core, in_axes=(rows, rows, rows, gates), out_axes=rows)(q, k, v,
                                                                                 log_decay)
