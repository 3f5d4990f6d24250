"""The files of a Hugging Face model directory: config.json, the weights
(model.safetensors, or shards listed by model.safetensors.index.json) and
tokenizer.json. Read and written with the `safetensors` package's numpy API
(bfloat16 as ml_dtypes' type)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxkit.interop.errors import ConversionError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


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


def _weight_files(directory: Path) -> list[Path]:
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{str(index)!r} has no weight_map")
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    others = sorted(p.name for p in directory.glob("*.bin")) + \
        sorted(p.name for p in directory.glob("*.pt"))
    hint = f" ({', '.join(others)} not read: save the model with safe_serialization)" \
        if others else ""
    raise ConversionError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {str(directory)!r}{hint}")


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's safetensors file(s), by name."""
    tensors = {}
    for path in _weight_files(directory):
        if not path.is_file():
            raise ConversionError(f"weight file {str(path)!r} listed in {WEIGHTS_INDEX} is "
                                  "missing")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{str(path)!r} is not a readable safetensors file: "
                                  f"{str(e).splitlines()[0]}") from None
    return tensors


def read_hf_dir(directory: str | Path) -> tuple[dict, dict[str, np.ndarray], Path | None]:
    """(config.json, tensors by name, tokenizer.json path or None) of an HF
    model directory; ConversionError naming what is missing or unreadable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"Hugging Face model directory {str(directory)!r} does not exist")
    config = read_json(directory / CONFIG)
    tokenizer = directory / TOKENIZER
    return config, read_weights(directory), tokenizer if tokenizer.is_file() else None


def write_hf_dir(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """config.json and model.safetensors into an existing directory; the
    'pt' format metadata is what transformers checks for."""
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
