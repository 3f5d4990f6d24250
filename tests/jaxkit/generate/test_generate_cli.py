"""`jaxkit generate` end to end: a tiny run trained for two steps generates
from its checkpoint (streamed, and as a batch from a prompts file with a
paged int8 cache), from its exported parameters and from its int8
quantised model; bad input is one line before any model is loaded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxkit.cli import main

ROOT = Path(__file__).parents[3]
TINY = ["--set", "model.d_model=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.mlp_hidden=64", "--set", "model.max_seq_len=32", "--set", "data.seq_len=32",
        "--set", "data.batch_size=4", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
        "--set", "train.log_every=1", "--set", "train.progress=false"]
INT8 = ["--set", "model.quant.mode=int", "--set", "model.quant.weight_format=int8",
        "--set", "model.quant.activation_format=int8"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The arguments naming a quickstart-shaped run trained for 2 steps on a small corpus."""
    tmp = tmp_path_factory.mktemp("generate_cli")
    (tmp / "docs").mkdir()
    for i in range(4):
        (tmp / "docs" / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * 100)
    main(["data", "prepare", "--inputs", str(tmp / "docs"), "--out", str(tmp / "tok"),
          "--val-fraction", "0.3"])
    args = [str(ROOT / "configs/quickstart.yaml"), *TINY, "--set", f"data.path={tmp / 'tok'}"]
    main(["train", *args, "--set", "train.steps=2", "--run-dir", str(tmp / "run")])
    return tmp, args


def generate(capsys, *argv):
    capsys.readouterr()
    main(["generate", *argv])
    return capsys.readouterr().out.splitlines()


def test_streams_a_prompt_from_the_checkpoint(run):
    tmp, args = run
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", "generate", *args, "--run-dir",
                          str(tmp / "run"), "--prompt", "the qu", "--max-new-tokens", "5"],
                         capture_output=True, text=True, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    text, stats = out.stdout.splitlines()[-2:]
    assert text.startswith("the qu")
    stats = json.loads(stats)
    assert stats["finish_reasons"][0] in ("length", "eos") and stats["generated_tokens"] <= 5
    assert stats["prefill_tokens_per_s"] > 0 and stats["kv_cache"]["format"] == "float32"


def test_prompts_file_as_a_paged_int8_batch(run, capsys):
    tmp, args = run
    prompts = tmp / "prompts.txt"
    prompts.write_text("the quick\n\nbrown fox jumps over\n")
    lines = generate(capsys, *args, "--run-dir", str(tmp / "run"), "--prompts", str(prompts),
                     "--paged", "--page-size", "4", "--kv-cache", "int8", *GREEDY)
    results, stats = [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])
    assert [r["prompt"] for r in results] == ["the quick", "brown fox jumps over"]
    assert stats["kv_cache"]["format"] == "int8" and stats["kv_cache"]["paged"]
    assert stats["kv_cache"]["bytes_per_token"] == 2 * 2 * (16 + 4)  # k and v, 2 heads of 16


def test_exported_and_quantized_parameters(run, capsys):
    tmp, args = run
    from_run = generate(capsys, *args, "--run-dir", str(tmp / "run"), "--prompt", "fox", *GREEDY)
    main(["export", *args, "--run-dir", str(tmp / "run"), "--out", str(tmp / "export")])
    exported = generate(capsys, *args, "--params", str(tmp / "export"), "--prompt", "fox", *GREEDY)
    assert exported[0] == from_run[0]
    main(["quantize", *args, *INT8, "--run-dir", str(tmp / "run"), "--out", str(tmp / "q")])
    quantized = generate(capsys, *args, *INT8, "--params", str(tmp / "q"), "--prompt", "fox",
                         *GREEDY)
    assert quantized[0].startswith("fox") and json.loads(quantized[-1])["generated_tokens"] >= 1
    with pytest.raises(SystemExit) as exit_:  # the quantised arrays without their quant settings
        main(["generate", *args, "--params", str(tmp / "q"), "--prompt", "fox"])
    assert str(exit_.value).startswith(f"config error: the arrays in {tmp / 'q'} do not fit")


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "generate: --prompt is empty"),
    (["--prompt", "x", "--top-p", "1.5"], r"config error: generate.top_p must be in (0, 1], got 1.5"),
    (["--prompt", "x", "--temperature", "-1"], "config error: generate.temperature must be >= 0"),
    (["--prompt", "x" * 33], "generate: prompt 0 is 33 tokens, more than model.max_seq_len (32)"),
    (["--prompts", "missing.txt"], "prompts file 'missing.txt' not found"),
    (["--prompt", "x", "--run-dir", "nowhere"], "no checkpoint under nowhere/checkpoints"),
])
def test_bad_input_is_one_line(run, argv, message):
    _, args = run
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *args, *argv])
    assert str(exit_.value).startswith(message)
