"""The files of a Hugging Face model directory: config.json, the weights
(model.safetensors, or shards listed by model.safetensors.index.json) and
tokenizer.json. Read and written with the `safetensors` package's numpy API
(bfloat16 as ml_dtypes' type)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jaxkit.interop.errors import ConversionError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# safetensors dtype codes -> numpy dtype names
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"no {path.name} in {str(path.parent)!r}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{str(path)!r} is not valid JSON: {str(e).splitlines()[0]}") \
            from None
    if not isinstance(data, dict):
        raise ConversionError(f"{str(path)!r} must hold a JSON object")
    return data


def _weight_map(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> shard file, from model.safetensors.index.json (None
    without an index)."""
    index = directory / WEIGHTS_INDEX
    if not index.is_file():
        return None
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{str(index)!r} has no weight_map")
    return {name: directory / file for name, file in weight_map.items()}


def _weight_files(directory: Path) -> list[Path]:
    if (weight_map := _weight_map(directory)) is not None:
        return sorted(set(weight_map.values()))
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    others = sorted(p.name for p in directory.glob("*.bin")) + \
        sorted(p.name for p in directory.glob("*.pt"))
    hint = f" ({', '.join(others)} not read: save the model with safe_serialization)" \
        if others else ""
    raise ConversionError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {str(directory)!r}{hint}")


def _unreadable(path: Path, error: Exception) -> ConversionError:
    if not path.is_file():
        return ConversionError(f"weight file {str(path)!r} listed in {WEIGHTS_INDEX} is missing")
    return ConversionError(f"{str(path)!r} is not a readable safetensors file: "
                           f"{str(error).splitlines()[0]}")


def read_weights(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's safetensors file(s), by name."""
    tensors = {}
    for path in _weight_files(Path(directory)):
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(path, e) from None
    return tensors


def stored_dtype(directory: str | Path, name: str) -> str:
    """The dtype (a numpy name) of tensor `name`, read from its file's header."""
    directory = Path(directory)
    weight_map = _weight_map(directory)
    files = [weight_map[name]] if weight_map and name in weight_map else _weight_files(directory)
    for path in files:
        try:
            with safe_open(path, "np") as f:
                if name in f.keys():
                    code = f.get_slice(name).get_dtype()
                    return STORED_DTYPES.get(code, code)
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(path, e) from None
    raise ConversionError(f"the weights in {str(directory)!r} lack {name!r}")


def read_hf_config(directory: str | Path) -> tuple[dict, Path | None]:
    """(config.json, the tokenizer.json path or None) of an HF model
    directory; ConversionError naming what is missing or unreadable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"Hugging Face model directory {str(directory)!r} does not exist")
    tokenizer = directory / TOKENIZER
    return read_json(directory / CONFIG), tokenizer if tokenizer.is_file() else None


def write_hf_dir(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """config.json and model.safetensors into an existing directory; the
    'pt' format metadata is what transformers checks for."""
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
