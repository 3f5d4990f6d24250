"""experiments.kv_cache_quality: the teacher-forced decode path against the
full recompute (exact for a float cache, and for KIVI-2 until its first
group is quantized), greedy generation against it, the cache memory
accounting, and the study end to end on a run trained for two steps."""
import json

import numpy as np
import pytest
from flax import nnx

from experiments.kv_cache_quality import memory
from experiments.kv_cache_quality.decode_path import full_recompute, greedy, teacher_forced
from experiments.kv_cache_quality.run import main
from jaxkit.cli import main as jaxkit_main
from jaxkit.config import load_config
from jaxkit.generate import Engine
from jaxkit.models import Transformer
from pallas_kernels.decode_attention import kivi2_residual_bytes

VOCAB = 61
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.mlp_hidden=48", f"model.vocab_size={VOCAB}", "model.max_seq_len=64",
        "data.seq_len=64", "model.compute_dtype=float32", "model.attention.implementation=xla",
        "generate.attention_implementation=xla"]
PROMPT = 5


@pytest.fixture(scope="module")
def model():
    return Transformer(load_config(None, TINY).model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, (3, 64)).astype(np.int32)


def test_float_cache_is_the_full_recompute(model, tokens):
    engine = Engine(model, implementation="xla")
    logp, argmax = teacher_forced(engine, tokens, PROMPT)
    ref_logp, ref_argmax = full_recompute(engine, tokens, PROMPT)
    assert logp.shape == argmax.shape == (3, 64 - PROMPT)
    np.testing.assert_allclose(logp, ref_logp, atol=2e-5)
    np.testing.assert_array_equal(argmax, ref_argmax)


def test_kivi2_is_exact_until_its_first_group_is_quantized(model, tokens):
    logp, _ = teacher_forced(Engine(model, kv_cache="kivi2", implementation="xla"), tokens, PROMPT)
    ref_logp, _ = full_recompute(Engine(model, implementation="xla"), tokens, PROMPT)
    exact = 32 - PROMPT  # predictions from contexts of at most 31 tokens: all in the residual
    np.testing.assert_allclose(logp[:, :exact], ref_logp[:, :exact], atol=2e-5)
    assert np.abs(logp[:, exact:] - ref_logp[:, exact:]).max() > 1e-3


def test_greedy_generation_is_the_teacher_forced_argmax(model, tokens):
    engine = Engine(model, kv_cache="int8", implementation="xla")
    generated = greedy(engine, tokens[:, :PROMPT], 64 - PROMPT)
    _, argmax = teacher_forced(engine, np.concatenate([tokens[:, :PROMPT], generated], 1), PROMPT)
    np.testing.assert_array_equal(argmax, generated)


def test_memory_accounting():
    cfg = load_config(None, TINY).model
    L, B, C = cfg.num_layers, 3, 64
    per_token = memory.bytes_per_token_per_layer(cfg, "int8")
    assert per_token == 2 * (16 + 4)  # k and v: 16 int8 codes and a float32 scale
    assert memory.cache_bytes(cfg, "int8", B, C) == L * B * C * per_token
    residual = L * B * kivi2_residual_bytes(1, 16, residual_dtype=np.float32)
    assert memory.cache_bytes(cfg, "kivi2", B, C) == \
        L * B * C * memory.bytes_per_token_per_layer(cfg, "kivi2") + residual
    assert memory.parameter_count(memory.LLAMA2_7B) == 6_738_415_616
    peak = memory.peak(cfg, ("fp32", "kivi2"), B, C)
    weights = memory.parameter_count(cfg) * 4
    assert peak["formats"]["fp32"]["peak_bytes"] == weights + memory.cache_bytes(cfg, "fp32", B, C)
    assert peak["formats"]["fp32"]["peak_reduction"] == 1
    assert peak["formats"]["kivi2"]["peak_reduction"] > 1


def test_the_study_end_to_end(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"{i}: the quick brown fox jumps " * 100)
    jaxkit_main(["data", "prepare", "--inputs", str(tmp_path / "docs"), "--out",
                 str(tmp_path / "tok"), "--val-fraction", "0.3"])
    run = ["model.num_layers=1", "model.vocab_size=259", f"data.path={tmp_path / 'tok'}",
           "data.batch_size=2", "train.steps=2", "train.eval_every=0", "train.progress=false"]
    sets = [a for kv in TINY + run for a in ("--set", kv)]
    jaxkit_main(["train", "configs/quickstart.yaml", *sets, "--run-dir", str(tmp_path / "run")])
    main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--sequences", "4",
          "--prompts", "2", "--prompt-len", "8"])
    results = json.loads((tmp_path / "out" / "kv_cache_quality.json").read_text())
    assert results["perplexity"]["tokens"] == 4 * (64 - 8)
    assert abs(results["perplexity"]["compute"]["ppl_change"]) < 1e-4
    assert results["agreement"]["generated_tokens"] == 2 * (64 - 8)
    assert results["agreement"]["compute"]["teacher_forced"] == 1.0
    table = (tmp_path / "out" / "kv_cache_quality.md").read_text()
    assert "Against KIVI's claims" in table
    assert all(f"| {name} | " in table for name in ("compute", "int8", "fp8", "kivi2"))


def test_bad_arguments_stop_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--prompt-len must be in \\[1, 128\\)"):
        main(["--run-dir", str(tmp_path / "run"), "--prompt-len", "128"])
    assert not (tmp_path / "run").exists()
