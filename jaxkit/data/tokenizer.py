"""Byte-level tokenizer: UTF-8 bytes are the ids 0..255, then three specials."""
from __future__ import annotations

import numpy as np

NUM_BYTES = 256


class ByteTokenizer:
    """Lossless for any text UTF-8 can encode; needs no training and no files."""

    name = "byte"
    pad_id = NUM_BYTES
    bos_id = NUM_BYTES + 1
    eos_id = NUM_BYTES + 2

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + 3

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        parts = ([np.array([self.bos_id], np.int32)] if add_bos else []) + [body] \
            + ([np.array([self.eos_id], np.int32)] if add_eos else [])
        return np.concatenate(parts)

    def decode(self, ids) -> str:
        """Drops the specials; invalid UTF-8 (e.g. a cut multi-byte character)
        decodes to U+FFFD rather than failing, as sampled ids can be anything."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"decode expects a 1-D sequence of integer ids, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the byte vocabulary "
                             f"[0, {self.vocab_size})")
        data = ids[ids < NUM_BYTES].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")
