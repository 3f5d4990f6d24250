"""Deterministic next-token batches from a token file.

A batch is a pure function of (seed, step): a resumed run sees exactly the
stream a fresh run would, and every process draws the same global batch and
keeps its own contiguous slice of it."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxkit.data.token_file import TokenFile


def _check_non_negative(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous rows of the global batch."""
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index!r}")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    per_process = global_batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def document_segments(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) [B, S] of windows of concatenated documents,
    each ending in eos_id: a document starts after each EOS, its ids count
    the EOS tokens before it and its positions restart at 0."""
    rows, length = inputs.shape
    ends = inputs == eos_id
    starts = np.concatenate([np.ones((rows, 1), bool), ends[:, :-1]], axis=1)
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32) - 1
    index = np.arange(length, dtype=np.int32)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return segment_ids, index - first


class TokenBatcher:
    """Windows of seq_len + 1 tokens at random offsets: inputs are the first
    seq_len tokens, targets the last seq_len (inputs shifted by one). With
    eos_id, batches also carry per-document segment ids and positions
    (document_segments), so attention stays inside each document."""

    def __init__(self, token_file: TokenFile | str, seq_len: int, global_batch_size: int,
                 seed: int, eos_id: int | None = None):
        self.token_file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_non_negative("seed", seed)
        if self.token_file.num_tokens < seq_len + 1:
            raise ValueError(f"{self.token_file.bin_path} holds {self.token_file.num_tokens} tokens, "
                             f"fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.eos_id = eos_id

    @property
    def num_offsets(self) -> int:
        """Number of distinct window start positions."""
        return self.token_file.num_tokens - self.seq_len

    def _windows(self, offsets: np.ndarray) -> dict:
        idx = offsets[:, None] + np.arange(self.seq_len + 1)
        window = self.token_file.tokens[idx].astype(np.int32)
        batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
        if self.eos_id is not None:
            batch["segment_ids"], batch["positions"] = document_segments(batch["inputs"],
                                                                         self.eos_id)
        return batch

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        _check_non_negative("step", step)
        rows = process_slice(self.global_batch_size, process_index, process_count)
        rng = np.random.default_rng((self.seed, step))
        offsets = rng.integers(0, self.num_offsets, size=self.global_batch_size)
        return self._windows(offsets[rows])

    def eval_batches(self, num_batches: int, *, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
        """`num_batches` batches at fixed offsets spread evenly over the whole
        file (independent of the seed), so every evaluation sees the same data."""
        if not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        rows = process_slice(self.global_batch_size, process_index, process_count)
        count = num_batches * self.global_batch_size
        offsets = np.arange(count, dtype=np.int64) * (self.num_offsets - 1) // max(count - 1, 1)
        for b in range(num_batches):
            batch_offsets = offsets[b * self.global_batch_size:(b + 1) * self.global_batch_size]
            yield self._windows(batch_offsets[rows])
