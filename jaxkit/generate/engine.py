"""Batched generation on the device: a prefill and a decode step, each
compiled ahead of time once per shape (batch, padded prompt length, cache
layout) and per sampling mode, so no token recompiles anything: lengths,
sampling settings and which sequences are still running are data.

A batch of prompts of different lengths is right-padded to a bucket (a power
of two, at most model.max_seq_len). The cache holds, per sequence, the
prompt and every generated token but the last, and never more than
max_seq_len tokens: a sequence stops when its next token's position would
reach model.max_seq_len. The decode step feeds one token per sequence; the
caches are donated to it and updated in place.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.generate import cache as kv
from jaxkit.generate import kivi
from jaxkit.generate import sampling
from jaxkit.generate.fuse import fuse_projections
from jaxkit.generate.pages import PageAllocator, assign_pages, pages_for
from jaxkit.layers import Linear
from jaxkit.layers.moe import MoE
from jaxkit.models import unscan_layers
from pallas_kernels.decode_attention import IMPLEMENTATIONS

MIN_BUCKET = 16


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def bucket(n: int, cap: int) -> int:
    """The power of two >= n (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, power_of_two(n)))


def cast_weights(model) -> None:
    """Stores in the compute dtype the weights that every use casts to it
    first (float Linear kernels, the embedding, MoE experts): the results
    are the same, and a decode step, which reads every weight once, reads
    half the bytes of float32 weights. Router, norm and quantizer weights,
    used in float32, stay."""
    dtype = jnp.dtype(model.cfg.compute_dtype)
    weights = [model.embed]
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear) and m.quantizer is None:
            weights.append(m.kernel)
        elif isinstance(m, MoE) and m.gate is not None:
            weights += [m.gate, m.up, m.down]
    for w in weights:
        w.set_value(w[...].astype(dtype))


def check_implementation(name: str) -> None:
    """ValueError unless decode_attention offers implementation `name`."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"decode attention implementation {name!r} is not one of "
                         f"{IMPLEMENTATIONS}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """A batch's sampling settings, as device data. eos_id -1: none."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    eos_id: jax.Array
    max_new_tokens: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """tokens [B]: each sequence's newest token, fed next; lengths [B]:
    tokens in its cache; count [B]: tokens generated; active [B]: still
    generating."""
    tokens: jax.Array
    lengths: jax.Array
    count: jax.Array
    active: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one prefill or decode step produced: tokens [B], emitted [B]
    (the token belongs to its sequence: it was active) and active [B] after it."""
    tokens: jax.Array
    emitted: jax.Array
    active: jax.Array


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a compiled step is specialised to (the rest is data)."""
    greedy: bool
    filtered: bool  # top-k or top-p in use
    vocab_size: int  # ids at or beyond it are never drawn (the tokenizer's size)


class Engine:
    """Prefill and decode steps of a model with KV caches (the recurrent
    state of each linear attention layer: cache.StateCache).

    model: a jaxkit Transformer (scanned layers are unrolled, MoE layers
    route every token to its experts without capacity drops, as one
    token's result must not depend on the batch; projections that share an
    input run as one matmul: jaxkit.generate.fuse); kv_cache: a
    generate.kv_cache choice; paged with page_size: a page pool per layer;
    implementation: decode_attention's."""

    def __init__(self, model, *, kv_cache: str = "compute", paged: bool = False,
                 page_size: int = 16, implementation: str = "auto"):
        check_implementation(implementation)
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        model = nnx.clone(unscan_layers(model))  # the caller's modules and variables stay as they are
        model.eval()
        for _, m in nnx.iter_modules(model):
            if isinstance(m, MoE):
                if m.cfg.router == "expert_choice":
                    raise ValueError("MoE router 'expert_choice' lets experts pick among all "
                                     "tokens, later ones included, so it cannot decode")
                m.cfg = dataclasses.replace(m.cfg, dispatch="dropless")
        cast_weights(model)
        fuse_projections(model)  # launch-bound decode: q|k|v and gate|up as one matmul each
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.fmt = kv.storage(kv_cache, self.cfg.compute_dtype)
        if self.fmt == kv.KIVI:
            kivi.check_head_dim(self.cfg.dim_per_head)
            if paged and page_size % kivi.GROUP:
                raise ValueError(f"kv_cache kivi2 quantizes groups of {kivi.GROUP} tokens within "
                                 f"a page: page_size {page_size} is not a multiple of it")
        self.paged, self.page_size, self.implementation = paged, page_size, implementation
        self._compiled: dict = {}

    @property
    def bytes_per_token(self) -> int:
        """KV cache bytes a cached token takes (softmax layers only)."""
        c = self.cfg
        return kv.bytes_per_token(self.fmt, c.num_layers - kv.num_linear_layers(c), c.kv_heads,
                                  c.dim_per_head)

    @property
    def state_bytes_per_sequence(self) -> int:
        """Recurrent state bytes a sequence takes (linear attention layers)."""
        return kv.state_bytes_per_sequence(self.cfg)

    def capacity(self, cached_tokens: int) -> int:
        """Cache slots per sequence for sequences of up to cached_tokens
        tokens: a bucket, or the sliding window (the decode step feeds one
        token, so the window's slots suffice) rounded up to a multiple of
        MIN_BUCKET (the Hopper kernel copies 8-slot tiles), in whole pages
        when paged. KIVI-2: every position (no ring; see kivi.py) in whole
        groups."""
        c = self.cfg
        slots = bucket(cached_tokens, c.max_seq_len)
        if self.fmt == kv.KIVI:
            slots = pages_for(slots, kivi.GROUP) * kivi.GROUP
        elif c.attention.sliding_window is not None:
            slots = min(slots, -(-c.attention.sliding_window // MIN_BUCKET) * MIN_BUCKET)
        return pages_for(slots, self.page_size) * self.page_size if self.paged else slots

    def start(self, prompts: list[np.ndarray], *, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, seed: int, eos_id: int | None,
              vocab_size: int) -> Decoding:
        """Prefills fresh caches with the prompts (1-d int arrays, each
        1..max_seq_len tokens) and draws each sequence's first token."""
        c = self.cfg
        B, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
        padded = np.zeros((B, bucket(int(lengths.max()), c.max_seq_len)), np.int32)
        for row, p in zip(padded, prompts):
            row[:len(p)] = p
        cached = [min(int(n) + max_new_tokens - 1, c.max_seq_len) for n in lengths]
        if self.fmt == kv.KIVI:  # its padding is written too (kivi.py)
            cached = [max(n, padded.shape[1]) for n in cached]
        capacity = self.capacity(max(cached))
        allocator = pages = table = None
        if self.paged:
            need = sum(pages_for(min(n, capacity), self.page_size) for n in cached)
            # a power of two of pages, so that batches of similar size share a compiled step
            allocator = PageAllocator(power_of_two(need))
            pages = assign_pages(allocator, cached, capacity, self.page_size)
            table = jnp.asarray(pages.table)
            layout = (allocator.num_pages, self.page_size)
        else:
            layout = (B, capacity)
        settings = Sampling(jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k),
                            jnp.float32(top_p), jnp.uint32(seed),
                            jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(max_new_tokens))
        mode = Mode(greedy=temperature == 0, filtered=top_k > 0 or top_p < 1,
                    vocab_size=vocab_size)
        args = (self.state, table, jnp.asarray(padded), jnp.asarray(lengths), settings)
        prefill, compile_s = self._compile(self._prefill, (mode, layout), args)
        buffers, state, _ = prefill.out_info
        step, step_compile_s = self._compile(self._step, (mode,),
                                             (self.state, buffers, table, state, settings))
        started = time.perf_counter()
        buffers, state, first = prefill(*args)
        return Decoding(self, step, buffers, table, state, settings, first,
                        compile_s=compile_s + step_compile_s, started=started,
                        allocator=allocator, pages=pages, capacity=capacity)

    def _compile(self, fn, static: tuple, args):
        """fn(*static, *args) compiled for these argument shapes (the cache
        buffers, argument 1 of a step, donated), and the seconds compiling
        took (0 when compiled before)."""
        key = (fn.__name__, static, jax.tree.structure(args),
               tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
        if key in self._compiled:
            return self._compiled[key], 0.0
        donate = (1,) if fn == self._step else ()
        t = time.perf_counter()
        compiled = jax.jit(lambda *a: fn(*static, *a), donate_argnums=donate) \
            .lower(*args).compile()
        self._compiled[key] = compiled
        return compiled, time.perf_counter() - t

    def _choose(self, mode: Mode, logits, settings: Sampling, counts):
        logits = sampling.limit_vocab(logits, mode.vocab_size)
        if mode.greedy:
            return sampling.greedy(logits)
        keys = sampling.sequence_keys(settings.seed, logits.shape[0])
        return sampling.sample(logits, sampling.step_keys(keys, counts),
                               temperature=settings.temperature, top_k=settings.top_k,
                               top_p=settings.top_p, filtered=mode.filtered)

    def _advance(self, state: DecodeState, tokens, lengths, settings: Sampling):
        """The state after each active sequence drew `tokens`, its cache
        holding `lengths` tokens: a sequence goes on unless it drew EOS, has
        its max_new_tokens or the next token's position reaches max_seq_len."""
        count = state.count + state.active
        active = state.active & (tokens != settings.eos_id) & (count < settings.max_new_tokens) \
            & (lengths < self.cfg.max_seq_len)
        new = DecodeState(tokens, lengths, count, active)
        return new, StepOutput(tokens, state.active, active)

    def _prefill(self, mode, layout, params, table, tokens, lengths, settings):
        model = nnx.merge(self.graphdef, params)
        c = self.cfg
        caches = kv.model_caches(c, tokens.shape[0], layout, self.fmt, table,
                                 residual_dtype=c.compute_dtype)
        logits, caches = model.prefill(tokens, lengths, caches)
        start = _initial_state(lengths)
        state, out = self._advance(start, self._choose(mode, logits, settings, start.count),
                                   lengths, settings)
        return kv.buffers(caches), state, out

    def _step(self, mode, params, buffers, table, state: DecodeState, settings):
        model = nnx.merge(self.graphdef, params)
        lengths = state.lengths + state.active
        logits, caches = model.decode(state.tokens[:, None], lengths, kv.join(buffers, table),
                                      active=state.active, implementation=self.implementation)
        tokens = self._choose(mode, logits[:, 0], settings, state.count)
        state, out = self._advance(state, tokens, lengths, settings)
        return kv.buffers(caches), state, out


def _initial_state(lengths) -> DecodeState:
    B = len(lengths)
    return DecodeState(jnp.zeros((B,), jnp.int32), jnp.asarray(lengths, jnp.int32),
                       jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool))


class Decoding:
    """One batch in generation: its caches and state on the device; step()
    dispatches the next decode step (asynchronously) and returns its
    StepOutput; `first` is the prefill's."""

    def __init__(self, engine: Engine, step, buffers, table, state, settings, first, *,
                 compile_s: float, started: float, allocator, pages, capacity: int):
        self._engine, self._step = engine, step
        self._buffers, self._table, self._state, self._settings = buffers, table, state, settings
        self.first, self.compile_s, self.started = first, compile_s, started
        self._allocator, self.pages, self.capacity = allocator, pages, capacity
        self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(buffers))

    def step(self) -> StepOutput:
        self._buffers, self._state, out = self._step(self._engine.state, self._buffers,
                                                     self._table, self._state, self._settings)
        return out

    def close(self) -> None:
        """Gives the cache memory and the pages back."""
        if self.pages is not None:
            for own in self.pages.pages:
                self._allocator.free(own)
        self._buffers = None
