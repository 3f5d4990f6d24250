"""Token files: raw little-endian token ids (`<stem>.bin`) described by a JSON
header (`<stem>.json`). The header is written last, so its presence means the
data file is complete; readers memory-map the data instead of loading it.

The header names the tokenizer and its vocabulary size and, optionally, its
special ids ({"pad", "bos", "eos"}, each an id or null) and the file that
holds it, relative to the header's directory (`tokenizer_file`).

Packed token files (jaxkit.data.packing) hold rows of `row_len` tokens, with
a segment id for every token in `<stem>.segments.bin` (0: padding; 1, 2,
... the documents of a row); their header adds `row_len`, `document_tokens`
(the tokens that are not padding) and `pad_fraction`. Files without
`row_len` are one stream of documents, each ending in EOS. `sources` counts
the documents a file holds."""
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


def segments_path(path_stem) -> Path:
    stem = Path(path_stem)
    return stem.with_name(stem.name + ".segments.bin")


def _segment_dtype(row_len: int) -> np.dtype:
    """Segment ids of a row lie in [0, row_len]."""
    return _DTYPES[dtype_for_vocab(row_len + 1)]


def _replace_file(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


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
                     sources: int = 1, segment_ids=None) -> Path:
    """Writes `<stem>.bin` and `<stem>.json`; returns the .bin path. With
    segment_ids, tokens and segment_ids are packed rows [rows, row_len],
    and `<stem>.segments.bin` is written too."""
    tokens = np.asarray(tokens)
    if segment_ids is None and tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {tokens.shape}")
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        if tokens.ndim != 2 or tokens.shape[1] < 2 or segment_ids.shape != tokens.shape:
            raise DataError(f"packed tokens and segment_ids must both be [rows, row_len >= 2], "
                            f"got shapes {tokens.shape} and {segment_ids.shape}")
        if segment_ids.size and (segment_ids.min() < 0 or segment_ids.max() > tokens.shape[1]):
            raise DataError(f"segment ids span [{segment_ids.min()}, {segment_ids.max()}], "
                            f"outside [0, row_len={tokens.shape[1]}]")
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
    if segment_ids is not None:
        document_tokens = int(np.count_nonzero(segment_ids))
        header |= {"row_len": int(tokens.shape[1]), "document_tokens": document_tokens,
                   "pad_fraction": round(1 - document_tokens / max(tokens.size, 1), 6)}
    # Drop any old header first: a crash mid-write must not leave a stale
    # header describing a new, partial data file.
    json_path.unlink(missing_ok=True)
    _replace_file(tokens.astype(_DTYPES[dtype]).reshape(-1), bin_path)
    if segment_ids is not None:
        _replace_file(segment_ids.astype(_segment_dtype(tokens.shape[1])).reshape(-1),
                      segments_path(path_stem))
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
    row_len = header.get("row_len")
    if row_len is not None and (not isinstance(row_len, int) or isinstance(row_len, bool)
                                or row_len < 2 or header["num_tokens"] % row_len):
        raise DataError(f"token file header {json_path} has row_len={row_len!r}; expected an "
                        f"integer >= 2 dividing num_tokens={header['num_tokens']}")
    return header


def _memory_map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype)


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
        self.tokens = _memory_map(self.bin_path, dtype, header["num_tokens"])
        # Ids beyond the vocabulary index past the embedding table, which jax
        # clamps or fills silently: training goes wrong without an error.
        if self.tokens.size and (top := _max_token_id(self.tokens)) >= header["vocab_size"]:
            raise DataError(f"token data {self.bin_path} holds token id {top}, outside the "
                            f"vocabulary [0, {header['vocab_size']}) of its header "
                            f"{self.json_path}: the data is corrupt or the header understates "
                            f"the vocabulary")
        self.segment_ids = None if self.row_len is None else self._open_segments(path_stem)

    def _open_segments(self, path_stem) -> np.ndarray:
        path, dtype = segments_path(path_stem), _segment_dtype(self.row_len)
        if not path.exists():
            raise FileNotFoundError(f"segment ids {path} not found (its header {self.json_path} "
                                    f"describes packed rows)")
        if path.stat().st_size != self.num_tokens * dtype.itemsize:
            raise DataError(f"segment ids {path} hold {path.stat().st_size} bytes, not one "
                            f"{dtype.name} per token of {self.bin_path}")
        return _memory_map(path, dtype, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.header["num_tokens"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def tokenizer(self) -> str:
        return self.header["tokenizer"]

    @property
    def row_len(self) -> int | None:
        """The length of packed rows; None for a stream of documents."""
        return self.header.get("row_len")

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
        ids = tf.tokens[start:start + chunk]
        if tf.segment_ids is not None:  # padding is no text
            ids = ids[tf.segment_ids[start:start + chunk] != 0]
        # TokenFile has checked every id against the vocabulary
        counts += np.bincount(ids, minlength=tf.vocab_size)
    p = counts[counts > 0] / counts.sum()
    nats = float(-(p * np.log(p)).sum())
    return nats if unit == "nats" else nats / np.log(2.0)
