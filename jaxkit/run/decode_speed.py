"""Generation speed of a config's model on this machine, with its weights in
bfloat16 or quantised: compile time, prefill tokens/s and decode tokens/s at
each batch size, from random weights and random prompts (no checkpoint or
tokenizer needed), and on a GPU the weight-bandwidth roofline.

    python -m jaxkit.run.decode_speed configs/dense_1b.yaml --quant bf16 w8a8 int4 \
        --batch 1 8 64 [--prompt-len 512] [--steps 64] [--kv-cache int8] [--paged] \
        [--json out.json] [--set KEY=VALUE ...]

--quant names one or more weight formats, measured one after the other in
this process. Each converts the q, k, v, o, MLP and expert weights as
`jaxkit quantize` does in mode 'int' (jaxkit.quant.quantize_model; the
output head and the embedding stay in the compute dtype):
  bf16  no quantisation (the config must compute in bfloat16);
  w8a8  int8 weights per output channel and int8 activations per token
        (quant_matmul.w8a8_matmul);
  int4  int4 weights in groups of 128 along K, bf16 activations
        (quant_matmul.int4_weight_only_matmul: on Hopper its Mosaic decode
        kernel up to 64 rows, the portable kernel for longer prefills);
  fp8   e4m3 weights in 128x128 blocks, e4m3 activations in 1x128 blocks
        (quant_matmul.fp8_blockwise_matmul).
Every format is converted before anything compiles, so one that cannot
convert the model stops the run at once. The Engine runs q|k|v and gate|up
as one matmul each (jaxkit.generate.fuse), over the same weight bytes.

Every sequence decodes --steps tokens (EOS is ignored) after --warmup
steps. decode_tokens_per_s dispatches the steps back to back and waits once;
host_loop_tokens_per_s reads each step's tokens while the next runs, as
jaxkit generate does. weight_bytes_per_step counts every weight but an
untied embedding table (a step gathers one row of it a sequence);
hbm_gb_per_s adds the cached keys and values a step reads, and each
linear-attention layer's recurrent state (read and written once a step):
the rate a memory-bound decode step is bound by. On a GPU, a 512 MiB copy in the same
process (pallas_kernels.quant_matmul.bench.copy_bandwidth) gives the weight
roofline, batch x copy bandwidth / weight_bytes_per_step tokens/s, and the
fraction of it decode reaches; copy_fraction is hbm_gb_per_s over the copy's
rate (the KV cache included). A table of all results ends the output;
--json writes them after every measurement.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from jaxkit.config import QuantConfig, load_config
from jaxkit.generate import Engine
from jaxkit.models import unscan_layers
from jaxkit.quant import quantize_model
from jaxkit.run.build import build_model, check_config
from pallas_kernels.quant_matmul.bench import copy_bandwidth

_INT = dict(mode="int", granularity="block", block_size=128)
QUANT_FORMATS = {  # --quant name -> the QuantConfig `jaxkit quantize` converts with (None: none)
    "bf16": None,
    "w8a8": QuantConfig(mode="int", weight_format="int8", activation_format="int8"),
    "int4": QuantConfig(weight_format="int4", **_INT),
    "fp8": QuantConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3", **_INT),
}


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


def weight_bytes_per_step(engine: Engine) -> int:
    """Bytes of the weights a decode step reads: all of them but an untied
    embedding table, of which it gathers one row a sequence."""
    state = engine.state
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    return total if engine.cfg.tie_embeddings else total - state["embed"][...].nbytes


def measure(engine: Engine, batch: int, *, prompt_len: int, steps: int, warmup: int,
            seed: int = 0) -> dict:
    cfg = engine.cfg
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, prompt_len).astype(np.int32) for _ in range(batch)]
    new_tokens = 1 + warmup + 2 * steps
    decoding = engine.start(prompts, max_new_tokens=new_tokens, temperature=0.0, top_k=0,
                            top_p=1.0, seed=seed, eos_id=None, vocab_size=cfg.vocab_size)
    jax.block_until_ready(decoding.first.tokens)
    prefill_s = time.perf_counter() - decoding.started
    _timed(decoding, warmup, read_each=False)
    step_s = _timed(decoding, steps, read_each=False)
    host_step_s = _timed(decoding, steps, read_each=True)
    decoding.close()
    weights = weight_bytes_per_step(engine)
    mean_cached = prompt_len + warmup + 1.5 * steps
    if cfg.attention.sliding_window is not None:
        mean_cached = min(mean_cached, cfg.attention.sliding_window)
    step_bytes = weights + batch * (mean_cached * engine.bytes_per_token
                                    + 2 * engine.state_bytes_per_sequence)
    return {"batch": batch, "prompt_len": prompt_len, "compile_s": decoding.compile_s,
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_step_ms": 1e3 * step_s, "decode_tokens_per_s": batch / step_s,
            "host_loop_tokens_per_s": batch / host_step_s,
            "hbm_gb_per_s": step_bytes / step_s / 1e9,
            "weights_gb": sum(x.nbytes for x in jax.tree.leaves(engine.state)) / 1e9,
            "weight_bytes_per_step": weights,
            "kv_cache": engine.fmt, "kv_bytes_per_token": engine.bytes_per_token,
            "cache_gb": decoding.cache_bytes / 1e9}


def roofline(result: dict, copy_bytes_per_s: float | None) -> dict:
    """The weight-bandwidth roofline of a measure() result: the tokens/s a
    step reading its weights at the copy's rate would give, the fraction of
    it decode reached, and hbm_gb_per_s over the copy's rate (None without
    a copy bandwidth)."""
    if copy_bytes_per_s is None:
        return {"roofline_tokens_per_s": None, "roofline_fraction": None, "copy_fraction": None}
    ceiling = result["batch"] * copy_bytes_per_s / result["weight_bytes_per_step"]
    return {"roofline_tokens_per_s": ceiling,
            "roofline_fraction": result["decode_tokens_per_s"] / ceiling,
            "copy_fraction": result["hbm_gb_per_s"] * 1e9 / copy_bytes_per_s}


def quantized_model(model, name: str):
    """model with its weights converted to --quant format `name` (a new
    model, layers unrolled; bf16: model itself)."""
    qcfg = QUANT_FORMATS[name]
    if qcfg is None:
        return model
    converted = nnx.clone(unscan_layers(model))
    try:
        quantize_model(converted, qcfg)
    except ValueError as e:
        raise ValueError(f"--quant {name} cannot convert this model: {e}") from None
    return converted


def check_arguments(args, max_seq_len: int, compute_dtype: str) -> None:
    """ValueError naming the first argument decode_speed cannot honour."""
    unknown = [q for q in args.quant if q not in QUANT_FORMATS]
    if unknown:
        raise ValueError(f"--quant {unknown[0]!r} is not one of {list(QUANT_FORMATS)}")
    if len(set(args.quant)) != len(args.quant):
        raise ValueError(f"--quant names a format twice: {args.quant}")
    if "bf16" in args.quant and compute_dtype != "bfloat16":
        raise ValueError(f"--quant bf16 keeps the weights in the compute dtype, which is "
                         f"{compute_dtype}: set model.compute_dtype=bfloat16")
    for flag, values in (("--batch", args.batch), ("--prompt-len", [args.prompt_len]),
                         ("--steps", [args.steps])):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"{flag} must be >= 1, got {bad[0]}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    new_tokens = 1 + args.warmup + 2 * args.steps
    if args.prompt_len + new_tokens - 1 > max_seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} and {new_tokens} new tokens exceed "
                         f"model.max_seq_len {max_seq_len}")


def format_table(results: list[dict]) -> str:
    """One markdown row per (format, batch)."""
    def number(value, spec):
        return "-" if value is None else format(value, spec)
    lines = ["| quant | batch | compile s | prefill tok/s | decode tok/s | step ms | "
             "weights GB/step | roofline tok/s | of roofline | of copy (with KV) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(
            f"| {r['quant']} | {r['batch']} | {r['compile_s']:.1f} | "
            f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.1f} | "
            f"{r['decode_step_ms']:.2f} | {r['weight_bytes_per_step'] / 1e9:.3f} | "
            f"{number(r['roofline_tokens_per_s'], ',.0f')} | "
            f"{number(r['roofline_fraction'], '.0%')} | {number(r['copy_fraction'], '.0%')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quant", nargs="+", default=["bf16"], metavar="FORMAT",
                   help=f"weight formats, one or more of {list(QUANT_FORMATS)}")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps (twice: see above)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--kv-cache", default=None, help="generate.kv_cache (default: the config's)")
    p.add_argument("--paged", action="store_true")
    p.add_argument("--json", help="write the results here (after every measurement)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)
        check_arguments(args, cfg.model.max_seq_len, cfg.model.compute_dtype)
        g = cfg.generate
        model = build_model(cfg)
        engines = {name: Engine(quantized_model(model, name), kv_cache=args.kv_cache or g.kv_cache,
                                paged=args.paged or g.paged, page_size=g.page_size,
                                implementation=g.attention_implementation)
                   for name in args.quant}
    except ValueError as e:  # ConfigError included
        raise SystemExit(f"decode_speed: {e}") from None
    del model
    device = jax.devices()[0]
    copy = copy_bandwidth() if jax.default_backend() == "gpu" else None
    header = {"device": device.device_kind, "jax_version": jax.__version__, "config": args.config,
              "overrides": args.overrides, "paged": args.paged or g.paged,
              "copy_gb_per_s": None if copy is None else copy / 1e9}
    results = []
    for name, engine in engines.items():
        for batch in args.batch:
            result = measure(engine, batch, prompt_len=args.prompt_len, steps=args.steps,
                             warmup=args.warmup)
            results.append({"quant": name, **result, **roofline(result, copy)})
            print(json.dumps(results[-1]), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({**header, "results": results}, f, indent=1)
    print(json.dumps(header))
    print(format_table(results))


if __name__ == "__main__":
    main()
