"""Text in, text out: the Python API of generation.

    from jaxkit.generate import Generator
    g = Generator(model, tokenizer)          # or jaxkit.run.generate.load_generator
    out = g.generate(["def main(", "import o"], max_new_tokens=64, temperature=0.8,
                     top_p=0.95, seed=1, stop=["\\n\\n"])
    out.texts, out.finish_reasons, out.stats
    g.generate("class ", stream=lambda piece: print(piece, end="", flush=True))

Bad arguments raise GenerationError (a ValueError) naming the value before
anything is compiled.
"""
from __future__ import annotations

import collections
import dataclasses
import numbers
import time
from typing import Callable

import jax
import numpy as np

from jaxkit.config import ConfigError, GenerateConfig, check_ranges
from jaxkit.generate.engine import Engine
from jaxkit.generate.text import TextStream


class GenerationError(ValueError):
    """A prompt or setting that generation cannot take."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """texts and tokens (generated ids, EOS included) per prompt, in order;
    finish_reasons: 'eos', 'stop' (a stop string; the text ends before it),
    'length' (max_new_tokens) or 'max_seq_len'; stats: timings and the
    size of the KV cache (and of linear attention layers' recurrent states)."""
    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict

    @property
    def text(self) -> str:
        return self.texts[0]


_INTS = ("max_new_tokens", "top_k", "seed")
_REALS = ("temperature", "top_p")


def _settings(base: GenerateConfig, overrides: dict) -> GenerateConfig:
    """base with the given (non-None) overrides, checked like config keys."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if key in _INTS and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
            raise GenerationError(f"{key} must be an int, got {value!r}")
        if key in _REALS and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
            raise GenerationError(f"{key} must be a number, got {value!r}")
    if isinstance(given.get("stop"), str):
        given["stop"] = (given["stop"],)
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
        bad = [s for s in given["stop"] if not isinstance(s, str) or not s]
        if bad:
            raise GenerationError(f"stop strings must be non-empty strings, got {bad[0]!r}")
    settings = dataclasses.replace(base, **given)
    try:
        check_ranges(settings)
    except ConfigError as e:
        raise GenerationError(str(e)) from None
    return settings


def encode_prompts(tokenizer, prompts: str | list[str], max_seq_len: int,
                   add_bos: bool = False) -> list[np.ndarray]:
    """The prompts' token ids (each after the tokenizer's BOS id with
    add_bos), each checked to be 1..max_seq_len tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError(f"prompts must be a string or a non-empty list of strings, got "
                              f"{prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise GenerationError(f"prompt {i} is a {type(p).__name__}, not a string")
    if add_bos and tokenizer.bos_id is None:
        raise GenerationError(f"generate.add_bos: the {tokenizer.name} tokenizer has no BOS token")
    encoded = tokenizer.encode_batch(list(prompts), add_bos=add_bos)
    for i, ids in enumerate(encoded):
        if len(ids) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(ids) > max_seq_len:
            raise GenerationError(f"prompt {i} is {len(ids)} tokens, more than "
                                  f"model.max_seq_len ({max_seq_len})")
    return encoded


class Generator:
    """Generates text from a jaxkit Transformer with the tokenizer of its
    data. config: the generate section (KV cache format, paging and the
    decode attention implementation are fixed here; sampling, limits and
    stop strings are defaults that generate() may override)."""

    def __init__(self, model, tokenizer, config: GenerateConfig | None = None):
        config = GenerateConfig() if config is None else config
        self.config = _settings(config, {})
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise GenerationError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids, "
                                  f"more than the model's vocab_size {model.cfg.vocab_size}")
        self.tokenizer = tokenizer
        try:
            self.engine = Engine(model, kv_cache=config.kv_cache, paged=config.paged,
                                 page_size=config.page_size,
                                 implementation=config.attention_implementation)
        except ValueError as e:
            raise GenerationError(str(e)) from None

    @property
    def max_seq_len(self) -> int:
        return self.engine.cfg.max_seq_len

    def encode(self, prompts: str | list[str]) -> list[np.ndarray]:
        return encode_prompts(self.tokenizer, prompts, self.max_seq_len, self.config.add_bos)

    def generate(self, prompts: str | list[str], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, stream: Callable[[str], None] | None = None,
                 ignore_eos: bool = False) -> Generation:
        """Continues each prompt. None takes the config's value; temperature
        0 is greedy; top_k 0 and top_p 1 turn those filters off. stream (one
        prompt only) is called with each piece of text as it is decoded; the
        pieces add up to the returned text. ignore_eos: generate past EOS."""
        settings = _settings(self.config, dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop))
        if stream is not None and not callable(stream):
            raise GenerationError(f"stream must be callable, got {stream!r}")
        called = time.perf_counter()
        encoded = self.encode(prompts)
        if stream is not None and len(encoded) != 1:
            raise GenerationError(f"stream takes a single prompt, got {len(encoded)}")
        eos = None if ignore_eos else self.tokenizer.eos_id
        decoding = self.engine.start(
            encoded, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, eos_id=eos,
            vocab_size=self.tokenizer.vocab_size)
        try:
            texts, reasons, timing = self._run(decoding, settings, eos, stream)
        finally:
            decoding.close()
        return Generation([t.text for t in texts], [t.ids for t in texts], reasons,
                          self._stats(encoded, texts, decoding, timing, called))

    def _run(self, decoding, settings, eos, stream):
        """The host loop: reads each step's tokens while the next step runs."""
        texts = [TextStream(self.tokenizer, settings.stop) for _ in decoding.first.tokens]
        reasons: list[str | None] = [None] * len(texts)
        pending = collections.deque([decoding.first])
        first_at = steps = None
        while True:
            if None in reasons:
                pending.append(decoding.step())
            out = pending.popleft()
            tokens, emitted, active = jax.device_get((out.tokens, out.emitted, out.active))
            first_at = first_at or time.perf_counter()
            steps = 0 if steps is None else steps + 1
            for b in np.flatnonzero(emitted):
                if reasons[b] is not None:
                    continue
                piece = texts[b].push(tokens[b])
                if stream is not None and piece:
                    stream(piece)
                if texts[b].stopped:
                    reasons[b] = "stop"
                elif not active[b]:
                    reasons[b] = "eos" if tokens[b] == eos else (
                        "length" if len(texts[b].ids) == settings.max_new_tokens else "max_seq_len")
            if None not in reasons:
                break
        last_at = time.perf_counter()
        for t in texts:
            piece = t.finish()
            if stream is not None and piece:
                stream(piece)
        return texts, reasons, dict(first_at=first_at, last_at=last_at, steps=steps)

    def _stats(self, encoded, texts, decoding, timing, called) -> dict:
        prompt_tokens = sum(len(p) for p in encoded)
        generated = sum(len(t.ids) for t in texts)
        prefill_s = timing["first_at"] - decoding.started
        decode_s = timing["last_at"] - timing["first_at"]
        after_first = generated - len(texts)
        return {
            "prompts": len(texts), "prompt_tokens": prompt_tokens, "generated_tokens": generated,
            "compile_s": decoding.compile_s,
            "time_to_first_token_s": timing["first_at"] - called - decoding.compile_s,
            "prefill_s": prefill_s, "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_steps": timing["steps"], "decode_s": decode_s,
            "decode_tokens_per_s": after_first / decode_s if decode_s > 0 else None,
            "kv_cache": {"format": self.engine.fmt, "paged": self.engine.paged,
                         "page_size": self.engine.page_size if self.engine.paged else None,
                         "slots_per_sequence": decoding.capacity,
                         "bytes_per_token": self.engine.bytes_per_token,
                         "state_bytes_per_sequence": self.engine.state_bytes_per_sequence,
                         "allocated_bytes": decoding.cache_bytes},
        }
