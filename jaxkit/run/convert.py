"""`jaxkit convert`: a Hugging Face model directory (Llama, Mistral or
Mixtral: config.json, safetensors weights, tokenizer.json) to a jaxkit
model directory, and a jaxkit run or exported parameters to a Hugging Face
model directory.

    jaxkit convert hf-to-jaxkit HF_DIR --out DIR
        DIR/config.yaml     its model section from config.json; data.path is
                            DIR, whose tokenizer.json generation reads;
                            generate.add_bos where the HF tokenizer adds BOS
        DIR/params/         the parameters, as `jaxkit export` writes them
        DIR/tokenizer.json  copied from HF_DIR
    jaxkit generate DIR/config.yaml --params DIR/params --prompt ...
    jaxkit convert jaxkit-to-hf CONFIG [--run-dir RUN | --params DIR] --out HF_DIR
        config.json, model.safetensors, and the run's tokenizer as
        tokenizer.json + tokenizer_config.json

Inputs are read and checked, and the output is computed, before anything is
written; the output goes to a temporary directory beside --out, renamed to
--out at the end, so a failed conversion leaves nothing behind. An
existing --out is refused."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

from jaxkit.checkpoint import export_params
from jaxkit.config import Config, DataConfig, GenerateConfig, ModelConfig, save_config, validate
from jaxkit.data import ByteTokenizer, DataError, HFTokenizer, load_tokenizer
from jaxkit.interop import (ConversionError, hf_config_from_model, hf_from_params,
                            model_config_from_hf, params_from_hf, read_hf_config, read_weights,
                            stored_dtype, write_hf_dir)
from jaxkit.interop.hf_config import with_weight_dtype
from jaxkit.interop.hf_files import TOKENIZER, TOKENIZER_CONFIG
from jaxkit.interop.hf_tokenizer import (adds_bos, byte_tokenizer_json, tokenizer_config,
                                         with_bos_template)
from jaxkit.models import Transformer, count_params, unscan_layers
from jaxkit.run.load import load_model

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"output directory {str(out)!r} already exists; name a new one")


@contextlib.contextmanager
def staged_output(out: Path):
    """A new directory beside `out` to write into, renamed to `out` when the
    block ends without an error and removed when it raises."""
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        refuse_existing(out)  # created by someone else meanwhile
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _param_state(m: ModelConfig, params: dict) -> nnx.State:
    """The nnx parameter state of m's Transformer holding `params` (flat
    paths -> numpy arrays), as export_params writes it."""
    state = nnx.state(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))), nnx.Param)
    flat = nnx.to_flat_state(state)
    if {path for path, _ in flat} != set(params):
        raise ConversionError("the converted parameters do not match the model the config "
                              "describes")  # the table and the model disagree: a bug
    for path, var in flat:
        var.set_value(params[path])
    return state


def _hf_tokenizer(path: Path | None, vocab_size: int) -> HFTokenizer | None:
    """The HF directory's tokenizer, checked to be readable by jaxkit and to
    fit the model's vocabulary."""
    if path is None:
        return None
    try:
        tokenizer = HFTokenizer.from_file(path)
    except (DataError, ImportError) as e:
        raise ConversionError(f"tokenizer {str(path)!r}: {e}") from None
    if tokenizer.vocab_size > vocab_size:
        raise ConversionError(f"tokenizer {str(path)!r} has {tokenizer.vocab_size} tokens, more "
                              f"than the model's vocab_size {vocab_size}")
    return tokenizer


def convert_hf_to_jaxkit(hf_dir: str | Path, out: str | Path) -> dict:
    """Writes the jaxkit model directory of the HF model in hf_dir to out
    (see the module docstring); returns a summary."""
    out = Path(out).absolute()
    refuse_existing(out)
    hf_config, tokenizer_path = read_hf_config(hf_dir)
    # the config checked whole before any weights are read
    model_cfg = with_weight_dtype(model_config_from_hf(hf_config),
                                  stored_dtype(hf_dir, "model.embed_tokens.weight"))
    tokenizer = _hf_tokenizer(tokenizer_path, model_cfg.vocab_size)
    params = params_from_hf(read_weights(hf_dir), model_cfg)
    # data.path: where generation finds the tokenizer (token files to train or
    # evaluate on go elsewhere: --set data.path=...)
    tokenizer_config_path = Path(hf_dir) / TOKENIZER_CONFIG
    add_bos = tokenizer is not None and adds_bos(
        tokenizer_path.read_text(),
        tokenizer_config_path.read_text() if tokenizer_config_path.is_file() else None)
    cfg = Config(model=model_cfg, data=DataConfig(
        path=DataConfig.path if tokenizer is None else str(out),
        seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len)),
        generate=GenerateConfig(add_bos=add_bos))
    validate(cfg)
    state = _param_state(model_cfg, params)
    with staged_output(out) as staging:
        save_config(cfg, staging / CONFIG_FILE)
        export_params(state, staging / PARAMS_DIR)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / TOKENIZER)
    return {"architecture": hf_config["architectures"][0],
            "parameters": int(sum(v.size for v in params.values())),
            "config": str(out / CONFIG_FILE), "params": str(out / PARAMS_DIR),
            "tokenizer": None if tokenizer is None else str(out / TOKENIZER)}


def _run_tokenizer(cfg: Config) -> tuple[ByteTokenizer | HFTokenizer | None, str | None, str]:
    """(the run's tokenizer, its tokenizer.json text, why no text): the
    tokenizer of cfg's token files, if it has any."""
    if cfg.data.kind != "tokens":
        return None, None, f"data.kind {cfg.data.kind!r} has no tokenizer"
    try:
        tokenizer = load_tokenizer(cfg.data.path)
    except FileNotFoundError:
        return None, None, f"data.path {cfg.data.path!r} holds no token files or tokenizer.json"
    except DataError as e:
        raise ConversionError(f"data.path {cfg.data.path!r}: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConversionError(f"the {tokenizer.name} tokenizer of data.path {cfg.data.path!r} has "
                              f"{tokenizer.vocab_size} tokens, more than model.vocab_size "
                              f"{cfg.model.vocab_size}")
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer, tokenizer.path.read_text(), ""
    try:
        return tokenizer, byte_tokenizer_json(), ""
    except ImportError:
        return tokenizer, None, ("the byte-level tokenizer is written as a tokenizer.json by the "
                                 "'tokenizers' package, which is not installed")


def convert_jaxkit_to_hf(cfg: Config, out: str | Path, *, run_dir: str | Path | None = None,
                         params: str | Path | None = None) -> dict:
    """Writes the HF model directory of the latest intact checkpoint in
    run_dir, or of `params` (a `jaxkit export` directory), to out; returns a
    summary (its "tokenizer" is None, with the reason, when none is written)."""
    out = Path(out).absolute()
    refuse_existing(out)
    tokenizer, tokenizer_json, no_tokenizer = _run_tokenizer(cfg)
    if tokenizer_json is not None and cfg.generate.add_bos:
        if tokenizer.bos_id is None:
            raise ConversionError(f"generate.add_bos: the {tokenizer.name} tokenizer has no BOS "
                                  "token")
        tokenizer_json = with_bos_template(tokenizer_json, tokenizer.bos_id)
    hf_config = hf_config_from_model(cfg.model, tokenizer and tokenizer.special_ids)
    model = unscan_layers(load_model(cfg, run_dir=run_dir, params=params))
    flat = {path: np.asarray(var[...])
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = hf_from_params(flat, cfg.model)
    with staged_output(out) as staging:
        write_hf_dir(staging, hf_config, tensors)
        if tokenizer_json is not None:
            (staging / TOKENIZER).write_text(tokenizer_json)
            (staging / TOKENIZER_CONFIG).write_text(json.dumps(
                tokenizer_config(tokenizer_json, tokenizer.special_ids, cfg.generate.add_bos),
                indent=2) + "\n")
    summary = {"architecture": hf_config["architectures"][0], "parameters": count_params(model),
               "out": str(out)}
    if tokenizer_json is None:
        return summary | {"tokenizer": None, "no_tokenizer": no_tokenizer}
    return summary | {"tokenizer": str(out / TOKENIZER)}
