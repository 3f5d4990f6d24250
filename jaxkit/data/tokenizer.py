"""Tokenizers behind one interface (name, vocab_size, pad_id, bos_id, eos_id,
encode, decode): the byte-level tokenizer, which needs no training and no
files, and Hugging Face `tokenizers` files (tokenizer.json), such as the
byte-level BPE `train_bpe` learns.

A token-file directory names its tokenizer in its headers; `load_tokenizer`
returns it. A tokenizer.json is read only when text is encoded or decoded,
so training on prepared token files does not need the `tokenizers` package."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxkit.data.errors import DataError

NUM_BYTES = 256
TOKENIZER_FILE = "tokenizer.json"
# The specials train_bpe adds, at ids 0, 1, 2.
BPE_SPECIALS = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>"}
# Special-token spellings recognised in a given tokenizer.json, by role.
_KNOWN_SPECIALS = {
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>"),
    "bos": ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "eos": ("<|eos|>", "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
}
_INSTALL_HINT = 'pip install "jaxkit[tokenizers]"'


def _check_ids(ids, vocab_size: int, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"decode expects a 1-D sequence of integer ids, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the {what} vocabulary "
                         f"[0, {vocab_size})")
    return ids


def _with_specials(body: np.ndarray, bos_id, eos_id, add_bos: bool, add_eos: bool) -> np.ndarray:
    for flag, token, role in ((add_bos, bos_id, "BOS"), (add_eos, eos_id, "EOS")):
        if flag and token is None:
            raise ValueError(f"this tokenizer has no {role} token")
    parts = ([np.array([bos_id], np.int32)] if add_bos else []) + [body] \
        + ([np.array([eos_id], np.int32)] if add_eos else [])
    return np.concatenate(parts)


class ByteTokenizer:
    """UTF-8 bytes are the ids 0..255, then three specials. Lossless for any
    text UTF-8 can encode."""

    name = "byte"
    pad_id = NUM_BYTES
    bos_id = NUM_BYTES + 1
    eos_id = NUM_BYTES + 2

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + 3

    @property
    def special_ids(self) -> dict:
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        return _with_specials(body, self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[np.ndarray]:
        return [self.encode(text, add_bos, add_eos) for text in texts]

    def decode(self, ids) -> str:
        """Drops the specials; invalid UTF-8 (e.g. a cut multi-byte character)
        decodes to U+FFFD rather than failing, as sampled ids can be anything."""
        ids = _check_ids(ids, self.vocab_size, "byte")
        data = ids[ids < NUM_BYTES].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"BPE and tokenizer.json tokenizers need the 'tokenizers' package: "
                          f"{_INSTALL_HINT}") from None
    return tokenizers


def _read_hf(path: Path):
    """The tokenizer in `path`, encoding special-token spellings that occur in
    text as text (only `add_bos`/`add_eos` place specials)."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
    tokenizers = _tokenizers_module()
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises bare Exceptions on malformed files
        raise DataError(f"{str(path)!r} is not a tokenizers tokenizer.json: "
                        f"{str(e).splitlines()[0]}") from None
    hf.encode_special_tokens = True
    return hf


def _describe(hf, path: Path) -> dict:
    """kind (the model type, lower case), vocab_size and special ids of a
    tokenizer.json; an EOS token is required, as it separates documents."""
    specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    ids = {role: next((specials[s] for s in names if s in specials), None)
           for role, names in _KNOWN_SPECIALS.items()}
    if ids["eos"] is None:
        raise DataError(f"tokenizer {str(path)!r} has no end-of-text special token (one of "
                        f"{list(_KNOWN_SPECIALS['eos'])}); its specials are {sorted(specials)}")
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    # token files and embeddings are sized by the vocabulary: an id beyond it
    # would not fit them
    top = max(hf.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise DataError(f"tokenizer {str(path)!r} has token id {top}, beyond its vocabulary "
                        f"of {vocab_size} ids")
    return {"kind": type(hf.model).__name__.lower(), "vocab_size": vocab_size,
            "special_ids": ids}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json. Decoding drops the specials;
    invalid UTF-8 decodes to U+FFFD."""

    def __init__(self, path, kind: str, vocab_size: int, special_ids: dict, hf=None):
        self.path, self.name, self.vocab_size = Path(path), kind, vocab_size
        self.special_ids = dict(special_ids)
        self.pad_id, self.bos_id, self.eos_id = (special_ids[r] for r in ("pad", "bos", "eos"))
        self._hf = hf

    @classmethod
    def from_file(cls, path) -> HFTokenizer:
        path = Path(path)
        hf = _read_hf(path)
        return cls(path, hf=hf, **_describe(hf, path))

    @property
    def hf(self):
        """The `tokenizers.Tokenizer`, read on first use and checked against
        the description this object was made with."""
        if self._hf is None:
            hf = _read_hf(self.path)
            found = _describe(hf, self.path)
            expected = {"kind": self.name, "vocab_size": self.vocab_size,
                        "special_ids": self.special_ids}
            if found != expected:
                raise DataError(f"tokenizer {str(self.path)!r} is {found}, but the token files "
                                f"beside it were made with {expected}")
            self._hf = hf
        return self._hf

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        return self.encode_batch([text], add_bos, add_eos)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[np.ndarray]:
        """Encodes the texts in parallel (the library's own threads)."""
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode expects str, got {type(text).__name__}")
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [_with_specials(np.array(e.ids, np.int32), self.bos_id, self.eos_id,
                               add_bos, add_eos) for e in encodings]

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size, f"{self.name} tokenizer's")
        return self.hf.decode(ids.tolist(), skip_special_tokens=True)


def check_bpe_vocab_size(vocab_size) -> None:
    """Raises unless train_bpe can learn `vocab_size` ids here (the
    `tokenizers` package is installed), before any text is read."""
    minimum = len(BPE_SPECIALS) + NUM_BYTES
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) \
            or vocab_size < minimum:
        raise DataError(f"BPE vocab_size must be an integer >= {minimum} (the specials and 256 "
                        f"bytes), got {vocab_size!r}")
    _tokenizers_module()


def train_bpe(texts: Iterable[str], vocab_size: int, path, *, progress: bool = True) -> HFTokenizer:
    """Learns a byte-level BPE of exactly `vocab_size` ids (the pad, bos and
    eos specials at 0, 1, 2, all 256 bytes, then merges) from `texts`, and
    saves it to `path` (a tokenizer.json). Any text encodes without unknown
    tokens and decodes back exactly."""
    texts = list(texts)
    check_bpe_vocab_size(vocab_size)
    tk = _tokenizers_module()
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=int(vocab_size),
                                     special_tokens=list(BPE_SPECIALS.values()),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=progress)
    hf.train_from_iterator(texts, trainer, length=len(texts))
    learned = hf.get_vocab_size(with_added_tokens=True)
    if learned != vocab_size:
        raise DataError(f"the training text ({sum(map(len, texts))} characters) yields only "
                        f"{learned} BPE tokens, fewer than vocab_size={vocab_size}; lower the "
                        f"vocabulary size or add text")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(path))
    return HFTokenizer.from_file(path)


def load_tokenizer(data_dir) -> ByteTokenizer | HFTokenizer:
    """The tokenizer that made the token files in `data_dir` (train and val
    must agree), as their headers describe it; in a directory with no token
    files, its tokenizer.json (a model converted from Hugging Face)."""
    from jaxkit.data.token_file import read_header  # token_file stays free of tokenizers
    data_dir = Path(data_dir)
    if not (data_dir / "train.json").exists() and (data_dir / TOKENIZER_FILE).is_file():
        return HFTokenizer.from_file(data_dir / TOKENIZER_FILE)
    headers = [read_header(data_dir / split) for split in ("train", "val")]
    keys = ("tokenizer", "vocab_size", "special_ids", "tokenizer_file")
    described = [{k: h.get(k) for k in keys} for h in headers]
    if described[0] != described[1]:
        raise DataError(f"token files in {str(data_dir)!r} disagree on their tokenizer: "
                        f"train {described[0]}, val {described[1]}")
    header = described[0]
    if header["tokenizer_file"] is None:
        tok = ByteTokenizer()
        if header["tokenizer"] != tok.name or header["vocab_size"] != tok.vocab_size:
            raise DataError(f"token files in {str(data_dir)!r} name tokenizer "
                            f"{header['tokenizer']!r} with vocab_size {header['vocab_size']} "
                            f"but no tokenizer file")
        # Headers written before special ids were recorded hold byte data.
        if header["special_ids"] not in (None, tok.special_ids):
            raise DataError(f"token files in {str(data_dir)!r} record special ids "
                            f"{header['special_ids']}, not the byte tokenizer's {tok.special_ids}")
        return tok
    return HFTokenizer(data_dir / header["tokenizer_file"], header["tokenizer"],
                       header["vocab_size"], header["special_ids"])
