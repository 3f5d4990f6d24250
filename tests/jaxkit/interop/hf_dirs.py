"""Hugging Face model directories written with numpy alone (no torch): a
random model of a small jaxkit config as config.json, model.safetensors
and a byte-level tokenizer.json."""
import numpy as np

from jaxkit.config import load_config
from jaxkit.interop import hf_config_from_model, write_hf_dir
from jaxkit.interop.hf_tokenizer import byte_tokenizer_json
from jaxkit.interop.hf_weights import tensor_table

SMALL = ["model.vocab_size=260", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
         "model.mlp_hidden=48", "model.max_seq_len=32", "data.seq_len=32"]


def write_hf_model(path, overrides=(), dtype=np.float32) -> dict:
    """Writes the directory; returns its tensors by name."""
    m = load_config(None, SMALL + list(overrides)).model
    rng = np.random.default_rng(0)
    tensors = {e.hf_name: rng.standard_normal(e.hf_shape).astype(dtype) for e in tensor_table(m)}
    path.mkdir()
    write_hf_dir(path, hf_config_from_model(m), tensors)
    (path / "tokenizer.json").write_text(byte_tokenizer_json())
    return tensors
