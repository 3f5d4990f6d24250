"""Generation of linear attention models (model.mixer 'linear') and hybrids
(softmax attention every 2nd layer): through the caches (a recurrent state
per linear layer, keys and values per softmax layer, contiguous or paged)
the logits of every position after each prompt equal a full-recompute
forward, for a batch of prompts of different lengths; finished sequences
keep their state; `jaxkit generate` runs a tiny trained hybrid and
decode_speed the hybrid config shrunk.

Tolerance 1e-4 against logits of magnitude about 3 in float32: the
chunked op (prefill, full forward) and the token-by-token recurrence
(decode) sum the same terms in another order (observed: a few 1e-6).
An int8 KV cache of the softmax layers: 5e-2, as for softmax models."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generate_models import VOCAB, caches_for, layer_caches, teacher_forced, tiny_model
from jaxkit.cli import main
from jaxkit.generate import KVCache, StateCache
from jaxkit.run import decode_speed

ROOT = Path(__file__).parents[3]
PROMPT_LENGTHS = [7, 12, 3]
SEQUENCES = np.random.default_rng(0).integers(0, VOCAB, (3, 30))
LINEAR = ["model.mixer=linear", "model.linear_attention.chunk_size=16"]
HYBRID = LINEAR + ["model.softmax_every=2"]
FLOAT32 = 1e-4

CASES = {  # name: (model overrides, kv_cache, page size or None, KV slots, atol, tokens a step)
    "linear": (LINEAR, "compute", None, 24, FLOAT32, 1),
    "linear_per_key_decay_two_tokens_a_step": (
        LINEAR + ["model.linear_attention.decay=per_key"], "compute", None, 24, FLOAT32, 2),
    "hybrid_contiguous": (HYBRID, "compute", None, 24, FLOAT32, 1),
    "hybrid_paged": (HYBRID, "compute", 4, 24, FLOAT32, 1),
    # a ring of 8 slots for the window of 5, which the longer sequences wrap
    "hybrid_paged_window": (HYBRID + ["model.attention.sliding_window=5"], "compute", 4, 8,
                            FLOAT32, 1),
    "hybrid_int8_kv": (HYBRID, "int8", 4, 24, 5e-2, 1),
    # the portable Pallas kernel (interpreted on a CPU) prefills the linear layers
    "hybrid_blockspec_prefill": (HYBRID + ["model.linear_attention.implementation=blockspec"],
                                 "compute", None, 24, FLOAT32, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cache_matches_full_forward(case):
    overrides, kv_cache, page_size, slots, atol, per_step = CASES[case]
    model = tiny_model(*overrides)
    caches = layer_caches(model.cfg, len(PROMPT_LENGTHS), slots, kv_cache, page_size)
    assert [type(c) for c in caches] == [StateCache,
                                         KVCache if model.cfg.softmax_every else StateCache]
    steps = 6 // per_step
    (got,), want = teacher_forced(model, SEQUENCES, PROMPT_LENGTHS, [caches], steps, per_step)
    assert len(want) == steps * per_step + 1
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0,
                                   err_msg=f"position {i} after the prompts")


def test_finished_sequences_keep_their_caches():
    """A decode step where sequence 1 is not active leaves its state and its
    cached keys and values as they were; the others' states move on."""
    model = tiny_model(*HYBRID)
    B = len(PROMPT_LENGTHS)
    lengths = jnp.asarray(PROMPT_LENGTHS, jnp.int32)
    tokens = jnp.asarray(SEQUENCES[:, :max(PROMPT_LENGTHS)])
    _, before = model.prefill(tokens, lengths, layer_caches(model.cfg, B, 24))
    active = jnp.array([True, False, True])
    _, after = model.decode(tokens[:, :1], lengths + active, before, active=active,
                            implementation="xla")
    for old, new in zip(before, after):
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    moved = np.abs(np.asarray(after[0].state - before[0].state)).max(axis=(1, 2, 3))
    assert moved[0] > 0 and moved[2] > 0


def test_kv_caches_for_linear_layers_are_refused():
    model = tiny_model(*HYBRID)
    with pytest.raises(ValueError, match="caches its recurrent state, got a KVCache") as info:
        model.prefill(jnp.zeros((1, 4), jnp.int32), jnp.array([4]),
                      caches_for(model.cfg, 1, 8))
    assert "\n" not in str(info.value)


def test_generate_cli_on_a_tiny_trained_hybrid(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(f"document {i}: " + "the quick fox " * 60)
    main(["data", "prepare", "--inputs", str(tmp_path / "docs"), "--out", str(tmp_path / "tok"),
          "--val-fraction", "0.3"])
    args = [str(ROOT / "configs/hybrid_linear.yaml")]
    for kv in ["model.d_model=32", "model.num_layers=4", "model.num_heads=2",
               "model.num_kv_heads=2", "model.mlp_hidden=64", "model.max_seq_len=32",
               "model.softmax_every=2", "model.compute_dtype=float32",
               "model.linear_attention.chunk_size=16", "data.seq_len=32", "data.batch_size=4",
               f"data.path={tmp_path / 'tok'}", "train.eval_every=0", "train.log_every=1",
               "train.progress=false"]:
        args += ["--set", kv]
    main(["train", *args, "--set", "train.steps=2", "--run-dir", str(tmp_path / "run")])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\nfox\n")
    capsys.readouterr()
    main(["generate", *args, "--run-dir", str(tmp_path / "run"), "--prompts", str(prompts),
          "--paged", "--page-size", "4", "--temperature", "0", "--max-new-tokens", "5"])
    lines = capsys.readouterr().out.splitlines()
    results, stats = [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])
    assert [r["prompt"] for r in results] == ["the quick", "fox"]
    assert stats["generated_tokens"] >= 2
    kv = stats["kv_cache"]
    # layers 1 and 3 softmax (k and v, 2 heads of 16, float32); 0 and 2 a [2, 16, 16] state
    assert kv["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert kv["state_bytes_per_sequence"] == 2 * 2 * 16 * 16 * 4


def test_decode_speed_on_the_hybrid_config(tmp_path):
    out = tmp_path / "speed.json"
    # 8 layers: the config's 4-layer repeat twice, scanned (the Engine unrolls it)
    sets = ["model.d_model=64", "model.num_layers=8", "model.num_heads=2", "model.num_kv_heads=2",
            "model.mlp_hidden=128", "model.max_seq_len=32", "data.seq_len=32",
            "model.linear_attention.chunk_size=16"]
    decode_speed.main([str(ROOT / "configs/hybrid_linear.yaml"),
                       *[a for kv in sets for a in ("--set", kv)], "--quant", "bf16",
                       "--batch", "1", "2", "--prompt-len", "5", "--steps", "2", "--warmup", "1",
                       "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in results] == [1, 2]
    # two softmax layers (the 4th and 8th), k and v of 2 heads of 32 in bfloat16
    assert all(r["decode_tokens_per_s"] > 0 and r["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 2
               for r in results)
