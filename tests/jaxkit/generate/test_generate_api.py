"""The Generator: greedy generation equals greedy decoding by full
recompute for a batch of prompts of different lengths, sampling repeats
with its seed, stop strings, EOS and length limits end sequences, streaming
adds up to the text, nothing recompiles per token or per setting, and bad
arguments fail before anything compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from generate_models import tiny_model
from jaxkit.config import GenerateConfig
from jaxkit.data.tokenizer import ByteTokenizer
from jaxkit.generate import GenerationError, Generator

BYTES = ByteTokenizer()
PROMPTS = ["def f(x):", "import os\nimport sys\nfor", "a"]
BYTE_MODEL = ("model.vocab_size=259", "model.num_kv_heads=2")


def settings(**kw):
    """The generate section with the reference decode attention (tiny_model
    runs the reference flash attention): greedy runs compare tokens with a
    full recompute, exactly, on any machine."""
    return GenerateConfig(attention_implementation="xla", **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model(*BYTE_MODEL)


def greedy_by_recompute(model, prompt_ids, n):
    graphdef, state = nnx.split(model)
    width = model.cfg.max_seq_len
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    ids = list(prompt_ids)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(ids)] = ids
        ids.append(int(jnp.argmax(forward(state, jnp.asarray(padded))[0, len(ids) - 1])))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("paged, window", [(False, None), (True, 6)])
def test_greedy_batch_equals_full_recompute(model, paged, window):
    """Paged, with a sliding window of 6: the cache keeps 16 slots a
    sequence, a ring the longer sequences wrap."""
    if window is not None:
        model = tiny_model(*BYTE_MODEL, f"model.attention.sliding_window={window}")
    g = Generator(model, BYTES, settings(paged=paged, page_size=4))
    out = g.generate(PROMPTS, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert out.finish_reasons == ["length"] * 3
    for prompt, tokens, text in zip(PROMPTS, out.tokens, out.texts):
        assert tokens == greedy_by_recompute(model, BYTES.encode(prompt), 8)
        assert text == BYTES.decode(np.array(tokens))
    stats = out.stats
    assert stats["prompt_tokens"] == sum(map(len, PROMPTS)) and stats["generated_tokens"] == 24
    assert stats["decode_steps"] >= 7 and stats["prefill_tokens_per_s"] > 0
    kv = stats["kv_cache"]
    assert kv["format"] == "float32" and kv["bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    # contiguous: 3 sequences x 32 slots (the bucket of 24 + 8 - 1 tokens); paged: the
    # 4 + 4 + 2 pages of 4 slots the sequences need of the 16-slot ring, in a pool of 16 pages
    assert kv["slots_per_sequence"] == (16 if paged else 32)
    assert kv["allocated_bytes"] == (16 * 4 if paged else 3 * 32) * kv["bytes_per_token"]


def test_sampling_repeats_with_its_seed_and_compiles_once(model):
    g = Generator(model, BYTES, settings())
    kw = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, ignore_eos=True)
    first = g.generate(PROMPTS, seed=1, **kw)
    assert first.stats["compile_s"] > 0
    assert g.generate(PROMPTS, seed=1, **kw).tokens == first.tokens
    other = g.generate(PROMPTS, seed=2, **dict(kw, temperature=1.3, top_k=5, max_new_tokens=5))
    assert other.tokens != first.tokens and other.stats["compile_s"] == 0
    assert len(g.engine._compiled) == 2  # one prefill, one decode step


def test_kivi2_cache(model):
    """KIVI-2 (2-bit) caches generate; the first token, drawn by the prefill
    from exact keys and values, is the full-precision cache's."""
    exact = Generator(model, BYTES, settings(temperature=0)).generate(
        PROMPTS, max_new_tokens=4, ignore_eos=True)
    out = Generator(model, BYTES, settings(temperature=0, kv_cache="kivi2", paged=True,
                                           page_size=32)).generate(
        PROMPTS, max_new_tokens=4, ignore_eos=True)
    assert [t[0] for t in out.tokens] == [t[0] for t in exact.tokens]
    assert [len(t) for t in out.tokens] == [4] * 3
    # 2 layers x 2 heads x (2-bit keys and values, a float16 scale and zero per
    # channel per 32 tokens for keys, per 2 channels for values) of head_dim 8
    assert out.stats["kv_cache"]["bytes_per_token"] == 2 * 2 * (2 * 8 / 4 + 4 * 8 / 32 + 4 * 8 / 2)
    with pytest.raises(GenerationError, match="page_size 16 is not a multiple of it"):
        Generator(model, BYTES, settings(kv_cache="kivi2", paged=True, page_size=16))


def test_stop_string_and_stream(model):
    g = Generator(model, BYTES, settings(temperature=0, max_new_tokens=12))
    text = g.generate(PROMPTS[0], ignore_eos=True).text
    stop = text[5:7]
    pieces = []
    out = g.generate(PROMPTS[0], stop=[stop], stream=pieces.append, ignore_eos=True)
    assert out.text == text[:text.index(stop)] == "".join(pieces)
    assert out.finish_reasons == ["stop"]


def test_eos_and_max_seq_len_end_sequences(model):
    g = Generator(model, BYTES, settings(temperature=0))
    tokens = g.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).tokens[0]

    class EndsAtThird(ByteTokenizer):
        eos_id = tokens[2]
    out = Generator(model, EndsAtThird(), settings(temperature=0)).generate(
        PROMPTS[0], max_new_tokens=6)
    assert out.finish_reasons == ["eos"] and out.tokens[0] == tokens[:tokens.index(tokens[2]) + 1]
    # a prompt 3 tokens short of max_seq_len (40): 4 new tokens fill every position
    long = g.generate(["x" * 37, "y"], max_new_tokens=10, ignore_eos=True)
    assert long.finish_reasons == ["max_seq_len", "length"]
    assert [len(t) for t in long.tokens] == [4, 10]


def test_moe_layers_decode_without_capacity_drops():
    """One token's result must not depend on the batch: the engine routes
    every token to its experts (the cache tests check MoE decoding against
    the full forward); expert-choice routing, which sees later tokens, is
    refused."""
    moe = ("model.moe.num_experts=4", "model.moe.top_k=1", "model.moe.dispatch=capacity")
    original = tiny_model(*BYTE_MODEL, *moe, "model.compute_dtype=bfloat16")
    g = Generator(original, BYTES, settings())
    model = nnx.merge(g.engine.graphdef, g.engine.state)
    assert all(block.mlp.cfg.dispatch == "dropless" for block in model.blocks)
    # weights every use casts to bfloat16 are stored so; the router stays float32
    assert model.embed.dtype == model.blocks[0].mlp.gate.dtype == jnp.bfloat16
    assert model.blocks[0].mlp.router.dtype == jnp.float32
    # the caller's model is left alone
    assert original.blocks[0].mlp.cfg.dispatch == "capacity" and original.embed.dtype == jnp.float32
    choice = tiny_model(*BYTE_MODEL, *moe, "model.moe.router=expert_choice")
    with pytest.raises(GenerationError, match="expert_choice"):
        Generator(choice, BYTES, settings())


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(top_k=2.5), "top_k must be an int, got 2.5"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(stop=[""]), "stop strings must be non-empty strings"),
    (dict(prompts=["ok", ""]), "prompt 1 is empty"),
    (dict(prompts=["z" * 41]), r"prompt 0 is 41 tokens, more than model.max_seq_len \(40\)"),
    (dict(prompts=[]), "non-empty list of strings"),
    (dict(prompts=["a", "b"], stream=print), "stream takes a single prompt, got 2"),
])
def test_bad_arguments_fail_before_compiling(model, kwargs, message):
    g = Generator(model, BYTES, settings())
    prompts = kwargs.pop("prompts", "fine")
    with pytest.raises(GenerationError, match=message):
        g.generate(prompts, **kwargs)
    assert not g.engine._compiled
