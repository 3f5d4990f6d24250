"""Generation speed of a config's model on this machine: compile time,
prefill tokens/s and decode tokens/s at each batch size, from random weights
and random prompts (no checkpoint or tokenizer needed).

    python -m jaxkit.run.decode_speed configs/dense_1b.yaml --batch 1 8 64 \
        [--prompt-len 512] [--steps 64] [--kv-cache int8] [--paged] [--set KEY=VALUE ...]

Every sequence decodes --steps tokens (EOS is ignored) after --warmup
steps. decode_tokens_per_s dispatches the steps back to back and waits once;
host_loop_tokens_per_s reads each step's tokens while the next runs, as
jaxkit generate does. hbm_gb_per_s counts the weights and the cached keys
and values a step must read: the rate a memory-bound decode step is bound by.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxkit.config import load_config
from jaxkit.generate import Engine
from jaxkit.run.build import build_model, check_config


def _timed(decoding, steps: int, read_each: bool) -> float:
    """Seconds per decode step over `steps` steps."""
    start = time.perf_counter()
    previous = None
    for _ in range(steps):
        out = decoding.step()
        if read_each and previous is not None:
            jax.device_get(previous.tokens)
        previous = out
    jax.block_until_ready(previous.tokens)
    return (time.perf_counter() - start) / steps


def measure(engine: Engine, batch: int, *, prompt_len: int, steps: int, warmup: int,
            seed: int = 0) -> dict:
    cfg = engine.cfg
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, prompt_len).astype(np.int32) for _ in range(batch)]
    new_tokens = 1 + warmup + 2 * steps
    if prompt_len + new_tokens - 1 > cfg.max_seq_len:
        raise ValueError(f"--prompt-len {prompt_len} and {new_tokens} new tokens exceed "
                         f"model.max_seq_len {cfg.max_seq_len}")
    decoding = engine.start(prompts, max_new_tokens=new_tokens, temperature=0.0, top_k=0,
                            top_p=1.0, seed=seed, eos_id=None, vocab_size=cfg.vocab_size)
    jax.block_until_ready(decoding.first.tokens)
    prefill_s = time.perf_counter() - decoding.started
    _timed(decoding, warmup, read_each=False)
    step_s = _timed(decoding, steps, read_each=False)
    host_step_s = _timed(decoding, steps, read_each=True)
    decoding.close()
    weights = sum(x.nbytes for x in jax.tree.leaves(engine.state))
    mean_cached = prompt_len + warmup + 1.5 * steps
    if cfg.attention.sliding_window is not None:
        mean_cached = min(mean_cached, cfg.attention.sliding_window)
    step_bytes = weights + batch * mean_cached * engine.bytes_per_token
    return {"batch": batch, "prompt_len": prompt_len, "compile_s": decoding.compile_s,
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_step_ms": 1e3 * step_s, "decode_tokens_per_s": batch / step_s,
            "host_loop_tokens_per_s": batch / host_step_s,
            "hbm_gb_per_s": step_bytes / step_s / 1e9, "weights_gb": weights / 1e9,
            "kv_cache": engine.fmt, "kv_bytes_per_token": engine.bytes_per_token,
            "cache_gb": decoding.cache_bytes / 1e9}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps (twice: see above)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--kv-cache", default=None, help="generate.kv_cache (default: the config's)")
    p.add_argument("--paged", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_config(cfg)
    g = cfg.generate
    engine = Engine(build_model(cfg), kv_cache=args.kv_cache or g.kv_cache,
                    paged=args.paged or g.paged, page_size=g.page_size,
                    implementation=g.attention_implementation)
    device = jax.devices()[0]
    for batch in args.batch:
        result = measure(engine, batch, prompt_len=args.prompt_len, steps=args.steps,
                         warmup=args.warmup)
        print(json.dumps({"device": device.device_kind, "jax_version": jax.__version__,
                          "paged": engine.paged, **result}), flush=True)


if __name__ == "__main__":
    main()
