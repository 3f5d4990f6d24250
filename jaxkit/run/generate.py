"""`jaxkit generate`: text from a trained run, its exported parameters or
its `jaxkit quantize` output, on one device.

    from jaxkit.run.generate import load_generator
    g = load_generator("configs/quickstart.yaml")   # the run training wrote for it
    g.generate("def main(", max_new_tokens=64).text

The tokenizer is the one of the config's token files (data.path). Prompts
are checked (non-empty, at most model.max_seq_len tokens) before any model
is loaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxkit.config import Config, ConfigError, load_config
from jaxkit.generate import Generator
from jaxkit.generate.engine import check_implementation
from jaxkit.generate.generator import encode_prompts
from jaxkit.run.load import load_model
from jaxkit.run.trainer import run_dir_for


def load_tokenizer_of(cfg: Config):
    """The tokenizer of cfg's token files."""
    from jaxkit.data import load_tokenizer
    if cfg.data.kind != "tokens":
        raise ConfigError(f"generation needs the tokenizer of token files (data.kind 'tokens'), "
                          f"got data.kind {cfg.data.kind!r}")
    return load_tokenizer(cfg.data.path)


def load_generator(config: str | Path | Config, *, run_dir: str | Path | None = None,
                   params: str | Path | None = None, overrides: list[str] = ()) -> Generator:
    """A Generator for a config (a YAML path with `--set`-style overrides, or
    a Config): the model of its run (run_dir, default where training wrote
    it) or of params (see load_model), and its data's tokenizer."""
    path = None if isinstance(config, Config) else config
    cfg = config if path is None else load_config(path, list(overrides))
    if run_dir is None and params is None:
        run_dir = run_dir_for(cfg, path)
    tokenizer = load_tokenizer_of(cfg)
    return Generator(load_model(cfg, run_dir=run_dir, params=params), tokenizer, cfg.generate)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """--prompt TEXT, or the lines of --prompts FILE (blank lines skipped)."""
    if prompts_file is None:
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {prompts_file!r} not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise FileNotFoundError(f"prompts file {prompts_file!r} holds no prompt")
    return lines


SUMMARY = ("prompt_tokens", "generated_tokens", "compile_s", "time_to_first_token_s",
           "prefill_tokens_per_s", "decode_tokens_per_s", "kv_cache")


def run_generate(cfg: Config, *, config_path: str | None, run_dir: str | None,
                 params: str | None, prompts: list[str], out=None) -> dict:
    """The command: a single prompt streams its continuation after the
    prompt, several print one JSON line each; then one JSON line of stats
    (to `out`, default stdout)."""
    out = sys.stdout if out is None else out
    check_implementation(cfg.generate.attention_implementation)
    encode_prompts(load_tokenizer_of(cfg), prompts, cfg.model.max_seq_len, cfg.generate.add_bos)
    if run_dir is None and params is None:
        run_dir = run_dir_for(cfg, config_path)
    generator = load_generator(cfg, run_dir=run_dir, params=params)
    if len(prompts) == 1:
        out.write(prompts[0])
        result = generator.generate(prompts, stream=lambda piece: (out.write(piece), out.flush()))
        out.write("\n")
    else:
        result = generator.generate(prompts)
        for prompt, text, reason in zip(prompts, result.texts, result.finish_reasons):
            out.write(json.dumps({"prompt": prompt, "text": text, "finish_reason": reason}) + "\n")
    stats = {k: result.stats[k] for k in SUMMARY} | {"finish_reasons": result.finish_reasons}
    out.write(json.dumps(stats) + "\n")
    return stats
