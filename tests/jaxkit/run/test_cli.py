"""End to end through the command line: prepare data, train, evaluate, resume."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[3]
TINY = ["--set", "model.d_model=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.mlp_hidden=64", "--set", "model.max_seq_len=32", "--set", "data.seq_len=32",
        "--set", "data.batch_size=4", "--set", "train.eval_every=4", "--set", "train.eval_batches=2",
        "--set", "train.log_every=2", "--set", "checkpoint.every=4", "--set", "train.progress=false"]


def jaxkit(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", *args], capture_output=True,
                         text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def tiny_run(tmp_path, *overrides):
    """Prepares a small corpus under tmp_path; returns the arguments of a tiny
    quickstart run on it (config, overrides, data path, run directory)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * 200)
    jaxkit("data", "prepare", "--inputs", str(docs), "--out", str(tmp_path / "tok"),
           "--val-fraction", "0.3", cwd=ROOT)
    return [str(ROOT / "configs/quickstart.yaml"), *TINY, *overrides,
            "--set", f"data.path={tmp_path / 'tok'}", "--run-dir", str(tmp_path / "run")]


def test_prepare_train_eval_resume(tmp_path):
    common = tiny_run(tmp_path)
    first = json.loads(jaxkit("train", *common, "--set", "train.steps=4", cwd=tmp_path).splitlines()[-1])
    assert first["step"] == 4
    resumed = json.loads(jaxkit("train", *common, "--set", "train.steps=8", "--resume",
                                cwd=tmp_path).splitlines()[-1])
    assert resumed["step"] == 8
    records = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
    assert (tmp_path / "run/config.yaml").exists()
    assert list((tmp_path / "run/tensorboard").iterdir())
    ev = json.loads(jaxkit("eval", *common, cwd=tmp_path).splitlines()[-1])
    assert ev["step"] == 8 and ev["loss"] > 0
    # post-training quantisation of the run: int8 weights and activations
    quant = ["--set", "model.quant.mode=int", "--set", "model.quant.weight_format=int8",
             "--set", "model.quant.activation_format=int8", "--set", "model.quant.hadamard=true"]
    q = json.loads(jaxkit("quantize", *common, *quant, "--out", str(tmp_path / "q"),
                          cwd=tmp_path).splitlines()[-1])
    losses = q["eval_loss"]
    assert q["step"] == 8 and q["converted_layers"] == 7  # q, k, v, o, gate, up, down
    assert abs(losses["trained"] - ev["loss"]) < 1e-4
    assert abs(losses["ptq"] - losses["trained"]) < 0.05 and abs(losses["int"] - losses["ptq"]) < 1e-3
    assert q["converted_bytes"]["low_bit"] < q["converted_bytes"]["float"] / 3  # fp32 -> int8
    assert (tmp_path / "q").exists()


def test_quantize_a_qat_run(tmp_path):
    """A run trained with QAT converts with its own formats (and rotation);
    other formats are refused by name."""
    common = tiny_run(tmp_path, "--set", "model.quant.weight_format=int4",
                      "--set", "model.quant.granularity=block", "--set", "model.quant.block_size=16",
                      "--set", "model.quant.hadamard=true")
    jaxkit("train", *common, "--set", "model.quant.mode=qat", "--set", "train.steps=4",
           cwd=tmp_path)
    q = json.loads(jaxkit("quantize", *common, "--set", "model.quant.mode=int",
                          cwd=tmp_path).splitlines()[-1])
    assert q["trained_quant_mode"] == "qat" and q["converted_layers"] == 7
    # QAT already simulates these formats: conversion changes nothing but rounding
    losses = q["eval_loss"]
    assert abs(losses["ptq"] - losses["trained"]) < 1e-4 and abs(losses["int"] - losses["ptq"]) < 1e-3
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", "quantize", *common,
                          "--set", "model.quant.mode=int", "--set", "model.quant.block_size=32"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "only the mode may change" in out.stderr


def test_missing_data_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", "train",
                          str(ROOT / "configs/quickstart.yaml"), "--set",
                          f"data.path={tmp_path / 'nothing'}"], capture_output=True, text=True)
    assert out.returncode != 0 and "jaxkit data prepare" in out.stderr


QUICKSTART = str(ROOT / "configs/quickstart.yaml")


def byte_token_files(directory, corrupt: bool = False):
    """train/val token files of the byte tokenizer in directory; corrupt: the
    train file holds an id (300) beyond its 259-id vocabulary."""
    from jaxkit.data import write_token_file
    for split in ("train", "val"):
        write_token_file(directory / split, np.arange(2000) % 259, 259)
    if corrupt:
        data = directory / "train.bin"
        tokens = np.fromfile(data, "<u2")
        tokens[1234] = 300
        tokens.tofile(data)
    return directory


def bad_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  d_model: [64\n")
    return ["train", str(tmp_path / "bad.yaml")], f"config error: {tmp_path / 'bad.yaml'}: invalid YAML"


def out_of_range(tmp_path):
    return (["train", QUICKSTART, "--set", "optimizer.b2=1"],
            "config error: optimizer.b2 must be in [0, 1), got 1.0")


def prepare_inputs(tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    return (["data", "prepare", "--inputs", str(tmp_path / "one.txt"), "--out", str(tmp_path / "o")],
            "data error: need at least 2 text documents")


def corrupt_token_file(tmp_path):
    data = byte_token_files(tmp_path, corrupt=True)
    return (["train", QUICKSTART, "--set", f"data.path={data}", "--run-dir", str(tmp_path / "run")],
            f"data error: token data {data / 'train.bin'} holds token id 300, outside the vocabulary")


def missing_checkpoint(tmp_path):
    data = byte_token_files(tmp_path)
    return (["eval", QUICKSTART, "--set", f"data.path={data}", "--run-dir", str(tmp_path / "run")],
            f"no checkpoint under {tmp_path / 'run' / 'checkpoints'}")


def existing_quantize_out(tmp_path):
    """Refused before the run is even looked for: no run exists here."""
    (tmp_path / "q").mkdir()
    return (["quantize", QUICKSTART, "--set", "model.quant.mode=ptq", "--set",
             "model.quant.weight_format=int8", "--run-dir", str(tmp_path / "run"),
             "--out", str(tmp_path / "q")],
            f"output directory '{tmp_path / 'q'}' already exists")


ANTICIPATED = [bad_yaml, out_of_range, prepare_inputs, corrupt_token_file, missing_checkpoint,
               existing_quantize_out]


@pytest.mark.parametrize("case", ANTICIPATED, ids=lambda c: c.__name__)
def test_anticipated_errors_are_one_line(case, tmp_path):
    args, expected = case(tmp_path)
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", *args], capture_output=True,
                         text=True, cwd=tmp_path)
    # the error is the last line; progress bars may precede it
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1].startswith(expected), out.stderr[-3000:]


@pytest.mark.parametrize("case, error", [(bad_yaml, "ConfigError"), (prepare_inputs, "DataError")],
                         ids=["config", "data"])
def test_debug_shows_the_traceback(case, error, tmp_path):
    args, expected = case(tmp_path)
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", "--debug", *args],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback (most recent call last):" in out.stderr
    assert f"{error}: {expected.split(': ', 1)[1]}" in out.stderr, out.stderr[-3000:]
