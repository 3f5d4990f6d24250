"""Hugging Face directories as checkpoints come: weights in shards listed by
model.safetensors.index.json, bfloat16 and float16 weights; config.json is
checked before any weights are read; the command both ways; a run without
a tokenizer."""
import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_dirs import SMALL, write_hf_model
from safetensors.numpy import load_file, save_file

from jaxkit.checkpoint import export_params
from jaxkit.config import load_config
from jaxkit.interop import ConversionError
from jaxkit.run.build import build_model
from jaxkit.run.cli import main
from jaxkit.run.convert import convert_hf_to_jaxkit, convert_jaxkit_to_hf


def _shard(directory) -> None:
    """model.safetensors split into two shards and an index, as
    transformers writes large models."""
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, directory / file, metadata={"format": "pt"})
    weight_map = {n: file for file, shard in shards.items() for n in shard}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("dtype, param_dtype, compute_dtype, back", [
    (ml_dtypes.bfloat16, "bfloat16", "bfloat16", ml_dtypes.bfloat16),
    (np.float16, "float32", "float16", np.float32)])
def test_sharded_low_precision_weights_convert_and_come_back(dtype, param_dtype, compute_dtype,
                                                             back, tmp_path):
    tensors = write_hf_model(tmp_path / "hf", ["model.tie_embeddings=false"], dtype)
    _shard(tmp_path / "hf")
    summary = convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "jk")
    cfg = load_config(summary["config"])
    assert (cfg.model.param_dtype, cfg.model.compute_dtype) == (param_dtype, compute_dtype)
    convert_jaxkit_to_hf(cfg, tmp_path / "back", params=summary["params"])
    again = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(again) == sorted(tensors)
    for name, value in tensors.items():  # float16 -> float32 is exact
        assert again[name].dtype == back and np.array_equal(again[name], value.astype(back)), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["torch_dtype"] == param_dtype


def test_missing_shard_is_named(tmp_path):
    write_hf_model(tmp_path / "hf")
    _shard(tmp_path / "hf")
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="weight file .*model-00002-of-00002.safetensors' "
                       "listed in model.safetensors.index.json is missing"):
        convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "out")


def test_config_is_checked_before_the_weights_are_read(tmp_path):
    write_hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"mlp_bias": True}))
    with pytest.raises(ConversionError, match="mlp_bias true is not supported"):
        convert_hf_to_jaxkit(tmp_path / "hf", tmp_path / "out")


def test_command_converts_both_ways(tmp_path, capsys):
    tensors = write_hf_model(tmp_path / "hf", ["model.num_kv_heads=1"])
    main(["convert", "hf-to-jaxkit", str(tmp_path / "hf"), "--out", str(tmp_path / "jk")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == str(tmp_path / "jk" / "params")
    main(["convert", "jaxkit-to-hf", summary["config"], "--params", summary["params"],
          "--out", str(tmp_path / "back")])
    assert json.loads(capsys.readouterr().out)["architecture"] == "LlamaForCausalLM"
    again = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(again) == sorted(tensors)
    assert all(np.array_equal(again[name], value) for name, value in tensors.items())


def test_run_without_tokenizer_converts_and_says_so(tmp_path):
    cfg = load_config(None, SMALL + [f"data.path={tmp_path / 'no_data'}"])
    export_params(nnx.state(build_model(cfg), nnx.Param), tmp_path / "params")
    summary = convert_jaxkit_to_hf(cfg, tmp_path / "hf", params=tmp_path / "params")
    assert summary["tokenizer"] is None
    assert summary["no_tokenizer"] == f"data.path '{tmp_path / 'no_data'}' holds no token files " \
        "or tokenizer.json"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
