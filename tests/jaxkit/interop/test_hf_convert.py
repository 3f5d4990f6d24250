"""jaxkit convert against transformers' own models (float32, on CPU):
Hugging Face Llama (GQA and MQA, tied and untied), Mistral (sliding window,
wide heads) and Mixtral (4 experts, top 2) converted to jaxkit give the logits
transformers computes, and convert back to the very same tensors; jaxkit
models converted to Hugging Face load with AutoModelForCausalLM and give
jaxkit's logits; tokenizers survive both ways."""
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_models import CASES, VOCAB, hf_logits, load_hf_model, save_hf_model
from safetensors.numpy import load_file

from jaxkit.checkpoint import export_params
from jaxkit.config import load_config
from jaxkit.data import ByteTokenizer, load_tokenizer, write_token_file
from jaxkit.run.build import build_model
from jaxkit.run.convert import convert_hf_to_jaxkit, convert_jaxkit_to_hf
from jaxkit.run.generate import load_generator
from jaxkit.run.load import load_model

ATOL = 1e-4  # float32 logits of size ~4; measured differences are ~3e-6
# what a config.json says about the computation (as transformers reads it)
CONFIG_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
               "max_position_embeddings", "tie_word_embeddings", "sliding_window",
               "num_local_experts", "num_experts_per_tok", "dtype", "torch_dtype")


def _tokens(seed: int, vocab: int = VOCAB, shape=(2, 13)) -> np.ndarray:
    # 13 tokens: past Mistral's window of 5
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _assert_same_tensors(a_dir, b_dir) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_jaxkit_matches_transformers_and_converts_back(case, tmp_path):
    hf = save_hf_model(case, tmp_path / "hf")
    summary = convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "jk")
    cfg = load_config(summary["config"])
    tokens = _tokens(1)
    logits = np.asarray(load_model(cfg, params=summary["params"])(tokens)[0])
    np.testing.assert_allclose(logits, hf_logits(hf, tokens), atol=ATOL, rtol=0)

    convert_jaxkit_to_hf(cfg, tmp_path / "back", params=summary["params"])
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == \
        (tmp_path / "hf" / "tokenizer.json").read_text()
    original, again = (transformers.AutoConfig.from_pretrained(tmp_path / d).to_dict()
                       for d in ("hf", "back"))
    assert {k: again.get(k) for k in CONFIG_KEYS} == {k: original.get(k) for k in CONFIG_KEYS}


def test_converted_model_generates_transformers_greedy_tokens(tmp_path):
    """jaxkit generate on a converted model (its tokenizer.json found beside
    its config, KV-cached decoding) continues a prompt as transformers' full
    forward does, token by token."""
    hf = save_hf_model("llama_gqa_untied", tmp_path / "hf", seed=3)
    summary = convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "jk")
    generator = load_generator(summary["config"], params=summary["params"])
    out = generator.generate("def main(", max_new_tokens=8, temperature=0, ignore_eos=True)
    ids = ByteTokenizer().encode("def main(")[None]
    for _ in range(8):
        ids = np.concatenate([ids, hf_logits(hf, ids)[:, -1].argmax(-1)[:, None]], axis=1)
    assert out.tokens[0] == ids[0, -8:].tolist()


def test_tokenizer_that_adds_bos_makes_generation_add_it(tmp_path):
    """A Llama tokenizer that starts texts with BOS (tokenizer_config.json's
    add_bos_token) gives a converted config with generate.add_bos; prompts
    then start with BOS as transformers' do, and greedy decoding continues
    them as transformers does among the tokenizer's ids (jaxkit never samples
    an id the tokenizer cannot decode; this model's vocabulary is larger)."""
    hf = save_hf_model("llama_gqa_untied", tmp_path / "hf", seed=3)
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    summary = convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "jk")
    cfg = load_config(summary["config"])
    assert cfg.generate.add_bos
    generator = load_generator(summary["config"], params=summary["params"])
    out = generator.generate("def main(", max_new_tokens=8, temperature=0, ignore_eos=True)
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("def main(", add_bos=True)[None]
    for _ in range(8):
        step = hf_logits(hf, ids)[:, -1, :tokenizer.vocab_size].argmax(-1)
        ids = np.concatenate([ids, step[:, None]], axis=1)
    assert out.tokens[0] == ids[0, -8:].tolist()
    convert_jaxkit_to_hf(cfg, tmp_path / "back", params=summary["params"])
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back")("a")["input_ids"] == \
        [tokenizer.bos_id, ord("a")]


def _random_norm_scales(model, seed: int) -> None:
    """Norm scales away from their initial ones, so that swapping two norms
    would show."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "scale":
            var.set_value(rng.uniform(0.5, 1.5, var.shape).astype(np.float32))


def _byte_token_files(directory) -> None:
    tok = ByteTokenizer()
    for split in ("train", "val"):
        write_token_file(directory / split, tok.encode("def f(x):\n    return x\n" * 8),
                         tok.vocab_size, special_ids=tok.special_ids)


BASE = ["model.vocab_size=270", "model.d_model=64", "model.num_layers=2", "model.num_heads=4",
        "model.mlp_hidden=96", "model.max_seq_len=64", "model.rope_theta=5000",
        "model.norm_eps=1e-5", "model.compute_dtype=float32", "data.seq_len=64"]
JAXKIT_CASES = {
    "LlamaForCausalLM": ["model.num_kv_heads=2", "model.tie_embeddings=false",
                         "model.scan_layers=true"],
    "MistralForCausalLM": ["model.num_kv_heads=1", "model.attention.sliding_window=4"],
    "MixtralForCausalLM": ["model.num_kv_heads=2", "model.moe.num_experts=4", "model.moe.top_k=2",
                           "model.moe.expert_hidden=48", "model.attention.sliding_window=6"],
}


@pytest.mark.parametrize("architecture", list(JAXKIT_CASES))
def test_jaxkit_to_hf_loads_in_transformers_with_jaxkit_logits(architecture, tmp_path):
    _byte_token_files(tmp_path)
    cfg = load_config(None, BASE + JAXKIT_CASES[architecture] + [f"data.path={tmp_path}"])
    model = build_model(cfg, seed=7)
    _random_norm_scales(model, 7)
    export_params(nnx.state(model, nnx.Param), tmp_path / "params")
    summary = convert_jaxkit_to_hf(cfg, tmp_path / "hf", params=tmp_path / "params")
    assert summary["architecture"] == architecture

    hf = load_hf_model(tmp_path / "hf")
    assert type(hf).__name__ == architecture
    tokens = _tokens(2, cfg.model.vocab_size)
    np.testing.assert_allclose(hf_logits(hf, tokens), np.asarray(model(tokens)[0]),
                               atol=ATOL, rtol=0)


def test_byte_tokenizer_becomes_an_equal_hf_tokenizer(tmp_path):
    """A byte-level run's tokenizer.json: transformers' AutoTokenizer and
    jaxkit's loader both encode and decode as ByteTokenizer does."""
    _byte_token_files(tmp_path)
    cfg = load_config(None, BASE + [f"data.path={tmp_path}"])
    export_params(nnx.state(build_model(cfg), nnx.Param), tmp_path / "params")
    convert_jaxkit_to_hf(cfg, tmp_path / "hf", params=tmp_path / "params")
    text = "héllo\n\twörld 😀"
    expected = ByteTokenizer().encode(text).tolist()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(text)["input_ids"] == expected
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (256, 257, 258)
    assert auto.decode(expected + [258]) == text + "<|eos|>"
    jaxkit_side = load_tokenizer(tmp_path / "hf")  # no token files: the tokenizer.json
    special_text = text + "<|eos|>"  # jaxkit encodes special-token text as text
    assert jaxkit_side.encode(special_text).tolist() == \
        ByteTokenizer().encode(special_text).tolist()
    assert jaxkit_side.special_ids == ByteTokenizer().special_ids
