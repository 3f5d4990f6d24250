"""jaxkit convert refuses bad input with one line naming it, before writing
anything, and a conversion that fails while writing leaves nothing behind.
The Hugging Face directories here are written with numpy (no torch)."""
import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_dirs import SMALL, write_hf_model

from jaxkit.checkpoint import export_params
from jaxkit.config import ConfigError, load_config
from jaxkit.interop import ConversionError
from jaxkit.run import convert
from jaxkit.run.build import build_model
from jaxkit.run.cli import main

def _rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text()) | changes
    (path / "config.json").write_text(json.dumps(config))


def _drop_tensor(path, name, replacement=None):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    tensors.pop(name)
    if replacement is not None:
        tensors.update(replacement)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


BAD_HF = {
    "unsupported architecture": (
        lambda p: _rewrite_config(p, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
        "architecture 'GPT2LMHeadModel' is not supported (supported: LlamaForCausalLM, "
        "MistralForCausalLM, MixtralForCausalLM)"),
    "rope scaling": (
        lambda p: _rewrite_config(p, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "config.json: rope_scaling type 'llama3' is not supported (jaxkit's rotary embeddings "
        "are unscaled)"),
    "rope parameters of transformers 5": (
        lambda p: _rewrite_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
        "config.json: rope_parameters type 'yarn' is not supported (jaxkit's rotary embeddings "
        "are unscaled)"),
    "attention bias": (
        lambda p: _rewrite_config(p, attention_bias=True),
        "config.json: attention_bias true is not supported (jaxkit's projections have no bias)"),
    "activation": (
        lambda p: _rewrite_config(p, hidden_act="gelu"),
        "config.json: hidden_act 'gelu' is not supported (jaxkit's MLP is SwiGLU: silu)"),
    "mlp shape": (
        lambda p: _rewrite_config(p, intermediate_size=64),
        "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [48, 32], the config describes "
        "[64, 32]"),
    "vocabulary": (
        lambda p: _rewrite_config(p, vocab_size=300),
        "tensor 'model.embed_tokens.weight' has shape [260, 32], the config describes [300, 32]"),
    "tokenizer larger than the vocabulary": (
        lambda p: (_rewrite_config(p, vocab_size=250),
                   _drop_tensor(p, "model.embed_tokens.weight",
                                {"model.embed_tokens.weight": np.zeros((250, 32), np.float32),
                                 "lm_head.weight": np.zeros((250, 32), np.float32)})),
        "has 259 tokens, more than the model's vocab_size 250"),
    "extra tensor": (
        lambda p: _drop_tensor(p, "model.norm.weight", {
            "model.norm.weight": np.ones(32, np.float32),
            "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
        "the weights hold 1 tensor(s) the config does not describe, first "
        "'model.layers.0.self_attn.q_proj.bias'"),
    "missing tensor": (
        lambda p: _drop_tensor(p, "model.layers.0.self_attn.k_proj.weight"),
        "the weights lack 1 tensor(s) the config describes, first "
        "'model.layers.0.self_attn.k_proj.weight'"),
    "missing config.json": (
        lambda p: (p / "config.json").unlink(),
        "no config.json in"),
    "missing weights": (
        lambda p: (p / "model.safetensors").unlink(),
        "no model.safetensors or model.safetensors.index.json in"),
    "unreadable weights": (
        lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00"),
        "model.safetensors' is not a readable safetensors file"),
    "float8 weights": (
        lambda p: _drop_tensor(p, "model.embed_tokens.weight", {
            "model.embed_tokens.weight": np.zeros((260, 32), ml_dtypes.float8_e4m3fn)}),
        "weights stored as float8_e4m3fn are not supported"),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_input_is_refused_before_writing(case, tmp_path):
    write_hf_model(tmp_path / "hf", ["model.tie_embeddings=false"])
    damage, message = BAD_HF[case]
    damage(tmp_path / "hf")
    with pytest.raises(ConversionError) as err:
        convert.convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "out")
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # the command says it in one line
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "hf-to-jaxkit", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert str(exit_.value) == f"convert: {err.value}" and "\n" not in str(exit_.value)


def test_existing_out_is_refused(tmp_path):
    write_hf_model(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="output directory .* already exists"):
        convert.convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    write_hf_model(tmp_path / "hf")

    def fail(state, directory):
        directory.mkdir()
        (directory / "partial").write_text("")
        raise OSError("disk full")
    monkeypatch.setattr(convert, "export_params", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


BAD_JAXKIT = {
    "router": (["model.moe.num_experts=4", "model.moe.router=sigmoid_bias"],
               "model.moe.router 'sigmoid_bias': Mixtral needs 'topk_softmax'"),
    "shared expert": (["model.moe.num_experts=4", "model.moe.num_shared_experts=1"],
                      "model.moe.num_shared_experts 1: Mixtral needs 0"),
    "dense first layer": (["model.num_layers=2", "model.moe.num_experts=4",
                           "model.moe.first_layer=1"],
                          "model.moe.first_layer 1: Mixtral needs 0"),
    "soft-capping": (["model.attention.logit_softcap=30"],
                     "model.attention.logit_softcap 30.0 has no equivalent"),
    "quantised": (["model.quant.mode=qat", "model.quant.weight_format=int8"],
                  "model.quant.mode 'qat': only float models convert"),
    "linear attention": (["model.mixer=linear"], "model.mixer 'linear': Llama, Mistral"),
    "block-sparse attention": (["model.attention.sparse.policy=window_sinks"],
                               "model.attention.sparse.policy 'window_sinks'"),
    "N:M sparsity": (["model.sparsity.enabled=true"], "model.sparsity: export the run"),
}


@pytest.mark.parametrize("case", list(BAD_JAXKIT))
def test_unsupported_jaxkit_model_is_refused_before_loading(case, tmp_path):
    overrides, message = BAD_JAXKIT[case]
    cfg = load_config(None, SMALL + overrides)
    # the parameters do not exist: the model is refused before they are looked for
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        convert.convert_jaxkit_to_hf(cfg, tmp_path / "hf", params=tmp_path / "none")
    assert not any(tmp_path.iterdir())


def test_parameters_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = load_config(None, SMALL)
    export_params(nnx.state(build_model(cfg), nnx.Param), tmp_path / "params")
    other = load_config(None, SMALL + ["model.vocab_size=300"])
    with pytest.raises(ConfigError, match="do not fit the model the config describes"):
        convert.convert_jaxkit_to_hf(other, tmp_path / "hf", params=tmp_path / "params")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]
