"""Token files: raw little-endian token ids (`<stem>.bin`) described by a JSON
header (`<stem>.json`). The header is written last, so its presence means the
data file is complete; readers memory-map the data instead of loading it.

The header names the tokenizer and its vocabulary size and, optionally, its
special ids ({"pad", "bos", "eos"}, each an id or null) and the file that
holds it, relative to the header's directory (`tokenizer_file`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxkit.data.errors import DataError

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_HEADER_KEYS = ("dtype", "num_tokens", "vocab_size", "tokenizer", "sources")
_SPECIAL_ROLES = ("pad", "bos", "eos")


def dtype_for_vocab(vocab_size: int) -> str:
    if vocab_size < 1:
        raise DataError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 2 ** 16:
        return "uint16"
    if vocab_size <= 2 ** 32:
        return "uint32"
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _paths(path_stem) -> tuple[Path, Path]:
    stem = Path(path_stem)
    return stem.with_name(stem.name + ".bin"), stem.with_name(stem.name + ".json")


def _special_ids_problem(special_ids, vocab_size: int) -> str | None:
    if not isinstance(special_ids, dict) or sorted(special_ids) != sorted(_SPECIAL_ROLES):
        return f"must be an object with keys {list(_SPECIAL_ROLES)}"
    for role, i in special_ids.items():
        if i is not None and (not isinstance(i, int) or isinstance(i, bool)
                              or not 0 <= i < vocab_size):
            return f"has {role}={i!r}, not null or an id in [0, {vocab_size})"
    return None


def write_token_file(path_stem, tokens, vocab_size: int, *, tokenizer: str = "byte",
                     special_ids: dict | None = None, tokenizer_file: str | None = None,
                     sources: int = 1) -> Path:
    """Writes `<stem>.bin` and `<stem>.json`; returns the .bin path."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"tokens must be integers, got dtype {tokens.dtype}")
    dtype = dtype_for_vocab(vocab_size)
    if special_ids is not None and (problem := _special_ids_problem(special_ids, vocab_size)):
        raise DataError(f"special_ids {special_ids!r} {problem}")
    if tokenizer_file is not None and special_ids is None:
        raise DataError(f"tokenizer_file {tokenizer_file!r} needs special_ids")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(f"token ids span [{tokens.min()}, {tokens.max()}], outside the "
                        f"vocabulary [0, {vocab_size})")
    bin_path, json_path = _paths(path_stem)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    header = {"dtype": dtype, "num_tokens": int(tokens.size), "vocab_size": int(vocab_size),
              "tokenizer": tokenizer, "sources": int(sources)}
    if special_ids is not None:
        header["special_ids"] = dict(special_ids)
    if tokenizer_file is not None:
        header["tokenizer_file"] = str(tokenizer_file)
    # Drop any old header first: a crash mid-write must not leave a stale
    # header describing a new, partial data file.
    json_path.unlink(missing_ok=True)
    tmp = bin_path.with_name(bin_path.name + ".tmp")
    tokens.astype(_DTYPES[dtype]).tofile(tmp)
    os.replace(tmp, bin_path)
    json_path.write_text(json.dumps(header, indent=1) + "\n")
    return bin_path


def _max_token_id(tokens: np.ndarray) -> int:
    """The largest id of a non-empty token array, read in chunks: a memory-mapped
    file streams through once (about 0.15 s per GB from the page cache)."""
    chunk = 1 << 26
    return max(int(tokens[start:start + chunk].max()) for start in range(0, tokens.size, chunk))


def read_header(path_stem) -> dict:
    """The validated JSON header of the token file `<path_stem>.json`, without
    touching its data."""
    _, json_path = _paths(path_stem)
    if not json_path.exists():
        raise FileNotFoundError(f"token file header {json_path} not found "
                                f"(create token files with `jaxkit data prepare`)")
    try:
        header = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"token file header {json_path} is not valid JSON: "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(header, dict) or any(k not in header for k in _HEADER_KEYS):
        raise DataError(f"token file header {json_path} must be an object with keys "
                        f"{list(_HEADER_KEYS)}, got {header!r}")
    if header["dtype"] not in _DTYPES:
        raise DataError(f"token file header {json_path} has dtype {header['dtype']!r}; "
                        f"expected one of {sorted(_DTYPES)}")
    for key in ("num_tokens", "vocab_size"):
        if not isinstance(header[key], int) or isinstance(header[key], bool) or header[key] < 0:
            raise DataError(f"token file header {json_path} has {key}={header[key]!r}; "
                            f"expected a non-negative integer")
    if "special_ids" in header and (
            problem := _special_ids_problem(header["special_ids"], header["vocab_size"])):
        raise DataError(f"token file header {json_path} special_ids "
                        f"{header['special_ids']!r} {problem}")
    if "tokenizer_file" in header and (not isinstance(header["tokenizer_file"], str)
                                       or "special_ids" not in header):
        raise DataError(f"token file header {json_path} has tokenizer_file="
                        f"{header['tokenizer_file']!r}; expected a file name, with special_ids")
    return header


class TokenFile:
    """A read-only, memory-mapped token file."""

    def __init__(self, path_stem):
        self.bin_path, self.json_path = _paths(path_stem)
        self.header = header = read_header(path_stem)
        dtype = _DTYPES[header["dtype"]]
        if not self.bin_path.exists():
            raise FileNotFoundError(f"token data {self.bin_path} not found "
                                    f"(its header {self.json_path} exists)")
        expected = header["num_tokens"] * dtype.itemsize
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise DataError(f"token data {self.bin_path} holds {actual} bytes but its header "
                            f"promises {header['num_tokens']} {header['dtype']} tokens "
                            f"({expected} bytes)")
        # np.memmap refuses empty files.
        self.tokens = (np.memmap(self.bin_path, dtype=dtype, mode="r") if expected
                       else np.zeros(0, dtype))
        # Ids beyond the vocabulary index past the embedding table, which jax
        # clamps or fills silently: training goes wrong without an error.
        if self.tokens.size and (top := _max_token_id(self.tokens)) >= header["vocab_size"]:
            raise DataError(f"token data {self.bin_path} holds token id {top}, outside the "
                            f"vocabulary [0, {header['vocab_size']}) of its header "
                            f"{self.json_path}: the data is corrupt or the header understates "
                            f"the vocabulary")

    @property
    def num_tokens(self) -> int:
        return self.header["num_tokens"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def tokenizer(self) -> str:
        return self.header["tokenizer"]

    def __repr__(self) -> str:
        return (f"TokenFile({str(self.bin_path)!r}, num_tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size})")


def unigram_entropy(token_file, unit: str = "nats") -> float:
    """Entropy of the file's own token frequencies, per token, in nats (the
    unit of the training loss) or bits: the loss of the best context-free
    predictor, the baseline a language model must beat."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    tf = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
    if tf.num_tokens == 0:
        raise DataError(f"{tf.bin_path} holds no tokens; its entropy is undefined")
    counts = np.zeros(tf.vocab_size, np.int64)
    chunk = 1 << 24  # bounds the int64 copy bincount makes
    for start in range(0, tf.num_tokens, chunk):
        # TokenFile has checked every id against the vocabulary
        counts += np.bincount(tf.tokens[start:start + chunk], minlength=tf.vocab_size)
    p = counts[counts > 0] / tf.num_tokens
    nats = float(-(p * np.log(p)).sum())
    return nats if unit == "nats" else nats / np.log(2.0)
