"""KV-cache formats on a trained model: memory, validation perplexity through
the decode path and next-token agreement, for generate.kv_cache 'compute'
(the compute dtype: float32 on the quickstart model), int8, fp8 and kivi2.

    python -m experiments.kv_cache_quality.run [--run-dir runs/kv_cache_quality]

The model is the latest checkpoint of --run-dir; a directory without one is
first trained with configs/quickstart.yaml (about 2-3 minutes on 2 CPU cores).
(a) Memory: bytes a token takes per layer, and the peak of weights plus
    caches for a batch and context, of the trained model and of
    Llama-2-7B's shape (memory.py; KIVI reports 2.6x less peak memory).
(b) Perplexity: --sequences validation windows of model.max_seq_len tokens,
    the first --prompt-len prefilled, then one decode step a token with each
    cache format (teacher forcing), scoring every later token; against one
    full-recompute forward over the same windows and tokens.
(c) Agreement: greedy continuations of --prompts validation prompts to the
    end of the context with the compute-dtype cache, then each format's
    argmax at every generated position, the compute-dtype continuation fed
    (teacher-forced: each next-token choice from the same context); and
    each format's own greedy continuation (free-running: one different
    token changes the rest).
KIVI-2's prefill appends its tokens one step at a time (kivi2_append), so the
prompts stay short (32 tokens). Writes <out>/kv_cache_quality.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.kv_cache_quality import decode_path, memory
from experiments.kv_cache_quality.report import write_markdown
from jaxkit.config import load_config
from jaxkit.data import TokenBatcher, TokenFile
from jaxkit.generate import Engine
from jaxkit.run.load import load_model
from jaxkit.run.trainer import train

CONFIG = "configs/quickstart.yaml"
FORMATS = ("compute", "int8", "fp8", "kivi2")
MEMORY_FORMATS = ("bf16", "int8", "fp8", "kivi2")  # the first is the ratios' base (KIVI's fp16)
TRAINED_BATCH = 64  # the trained model's memory case: this batch at its whole context
LLAMA_CASES = ((8, 4096), (64, 512), (256, 512))  # (batch, context) of Llama-2-7B's shape


def run_config(run_dir: Path):
    """The config of the run in run_dir, or CONFIG when it holds no
    checkpoint yet (trained_model trains it)."""
    if (run_dir / "checkpoints").is_dir():
        return load_config(run_dir / "config.yaml")
    return load_config(CONFIG, ["train.progress=false"])


def trained_model(cfg, run_dir: Path) -> tuple:
    """(the model of the run's latest checkpoint, seconds spent training it
    first when run_dir held no checkpoint)."""
    seconds = 0.0
    if not (run_dir / "checkpoints").is_dir():
        start = time.perf_counter()
        train(cfg, run_dir=run_dir)
        seconds = time.perf_counter() - start
    return load_model(cfg, run_dir=run_dir), seconds


def validation_windows(cfg, count: int, seed: int) -> np.ndarray:
    """[count, model.max_seq_len] tokens at random offsets of the validation split."""
    val = TokenFile(Path(cfg.data.path) / "val")
    return TokenBatcher(val, cfg.model.max_seq_len, count, seed).batch(0)["inputs"]


def in_chunks(fn, tokens: np.ndarray, size: int):
    """fn(rows, ...) -> tuple of [rows, ...] arrays, run on `size` rows at a
    time (one compiled shape) and concatenated."""
    parts = [fn(tokens[i:i + size]) for i in range(0, len(tokens), size)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def perplexity(engines: dict, windows: np.ndarray, prompt_len: int, chunk: int) -> dict:
    """(b): per format and for the full recompute, the perplexity of every
    token after the prompts, and the change against the full recompute with
    its standard error over the windows."""
    full, _ = in_chunks(lambda t: decode_path.full_recompute(engines["compute"], t, prompt_len),
                        windows, chunk)
    out = {"tokens": full.size, "full_recompute": {"ppl": float(np.exp(-full.mean()))}}
    for name, engine in engines.items():
        got, _ = in_chunks(lambda t: decode_path.teacher_forced(engine, t, prompt_len),
                           windows, chunk)
        per_window = (full - got).mean(axis=1)  # NLL increase of each window
        out[name] = {"ppl": float(np.exp(-got.mean())),
                     "nll_change": float(per_window.mean()),
                     "nll_change_se": float(per_window.std(ddof=1) / np.sqrt(len(per_window)))}
        out[name]["ppl_change"] = out[name]["ppl"] / out["full_recompute"]["ppl"] - 1
    return out


def agreement(engines: dict, prompts: np.ndarray, max_seq_len: int) -> dict:
    """(c): the compute-dtype cache's greedy continuations to the end of the
    context, and per format the share of next tokens chosen alike
    (teacher-forced), of identical free-running tokens, of identical
    continuations, and the mean generated tokens before the first difference."""
    prompt_len = prompts.shape[1]
    new = max_seq_len - prompt_len
    reference = decode_path.greedy(engines["compute"], prompts, new)
    sequences = np.concatenate([prompts, reference], axis=1)
    _, full = decode_path.full_recompute(engines["compute"], sequences, prompt_len)
    out = {"prompts": len(prompts), "generated_tokens": reference.size,
           "full_recompute": {"teacher_forced": float((full == reference).mean())}}
    for name, engine in engines.items():
        _, chosen = decode_path.teacher_forced(engine, sequences, prompt_len)
        own = decode_path.greedy(engine, prompts, new)
        same = own == reference
        first_difference = np.where(same.all(axis=1), new, np.argmin(same, axis=1))
        out[name] = {"teacher_forced": float((chosen == reference).mean()),
                     "free_running": float(same.mean()),
                     "identical_continuations": int(same.all(axis=1).sum()),
                     "tokens_before_first_difference": float(first_difference.mean())}
    return out


def memory_study(cfg) -> dict:
    """(a): bytes a token per layer, and peak memory cases."""
    models = {"trained": cfg.model, "llama2_7b": memory.LLAMA2_7B}
    per_token = {name: {f: memory.bytes_per_token_per_layer(m, f) for f in FORMATS}
                 for name, m in models.items()}
    cases = [("trained", memory.peak(cfg.model, MEMORY_FORMATS, TRAINED_BATCH,
                                     cfg.model.max_seq_len))]
    cases += [("llama2_7b", memory.peak(memory.LLAMA2_7B, MEMORY_FORMATS, batch, context))
              for batch, context in LLAMA_CASES]
    return {"bytes_per_token_per_layer": per_token,
            "parameters": {n: memory.parameter_count(m) for n, m in models.items()},
            "peak": [{"model": name, **case} for name, case in cases]}


def check_arguments(args, max_seq_len: int) -> None:
    if not 1 <= args.prompt_len < max_seq_len:
        raise SystemExit(f"--prompt-len must be in [1, {max_seq_len}) (model.max_seq_len), got "
                         f"{args.prompt_len}")
    for flag, value in (("--sequences", args.sequences), ("--prompts", args.prompts)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default="runs/kv_cache_quality",
                   help=f"a trained run; trained with {CONFIG} when it holds no checkpoint")
    p.add_argument("--out", default="experiments/kv_cache_quality/results",
                   help="kv_cache_quality.md and .json go here")
    p.add_argument("--sequences", type=int, default=256, help="validation windows for (b)")
    p.add_argument("--prompts", type=int, default=16, help="prompts for (c); also (b)'s chunk")
    p.add_argument("--prompt-len", type=int, default=32)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    cfg = run_config(run_dir)
    check_arguments(args, cfg.model.max_seq_len)
    model, train_s = trained_model(cfg, run_dir)
    engines = {f: Engine(model, kv_cache=f) for f in FORMATS}
    results = {
        "command": " ".join(["python -m experiments.kv_cache_quality.run", *argv]),
        "model": {"run_dir": str(run_dir), "train_steps": cfg.train.steps, "data": cfg.data.path,
                  "compute_dtype": cfg.model.compute_dtype, "max_seq_len": cfg.model.max_seq_len,
                  "kv_heads": cfg.model.kv_heads, "head_dim": cfg.model.dim_per_head,
                  "num_layers": cfg.model.num_layers},
        "storage": {f: e.fmt for f, e in engines.items()},
        "prompt_len": args.prompt_len,
        "memory": memory_study(cfg),
        "perplexity": perplexity(engines, validation_windows(cfg, args.sequences, seed=1),
                                 args.prompt_len, args.prompts),
        "agreement": agreement(engines, validation_windows(cfg, args.prompts, seed=2)
                               [:, :args.prompt_len], cfg.model.max_seq_len),
    }
    results["seconds"] = {"training": train_s, "total": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache_quality.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out / "kv_cache_quality.md")
    print((out / "kv_cache_quality.md").read_text())


if __name__ == "__main__":
    main()
