"""Deterministic next-token batches from a token file: windows at random
offsets of a stream of documents, or random rows of a packed file.

A batch is a pure function of (seed, step): a resumed run sees exactly the
stream a fresh run would, and every process draws the same global batch and
keeps its own contiguous slice of it."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxkit.data.errors import DataError
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


def _positions(starts: np.ndarray) -> np.ndarray:
    """[B, S] positions that restart at 0 where `starts` is true."""
    index = np.arange(starts.shape[1], dtype=np.int32)
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def document_segments(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) [B, S] of windows of concatenated documents,
    each ending in eos_id: a document starts after each EOS, its ids count
    the EOS tokens before it and its positions restart at 0."""
    ends = inputs == eos_id
    starts = np.concatenate([np.ones((inputs.shape[0], 1), bool), ends[:, :-1]], axis=1)
    return np.cumsum(starts, axis=1, dtype=np.int32) - 1, _positions(starts)


def packed_batch(tokens: np.ndarray, segments: np.ndarray, document_mask: bool) -> dict:
    """The batch of packed rows [B, seq_len + 1] and their segment ids: the
    loss counts the targets in their input's document (no padding, no first
    token of the next document); with document_mask, the segment ids and
    per-document positions too."""
    seg_in, seg_out = segments[:, :-1], segments[:, 1:]
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": ((seg_out == seg_in) & (seg_out != 0)).astype(np.float32)}
    if document_mask:
        starts = np.concatenate([np.ones((len(seg_in), 1), bool),
                                 seg_in[:, 1:] != seg_in[:, :-1]], axis=1)
        batch["segment_ids"], batch["positions"] = seg_in, _positions(starts)
    return batch


class TokenBatcher:
    """Windows of seq_len + 1 tokens: inputs are the first seq_len tokens,
    targets the last seq_len (inputs shifted by one). A stream of documents
    gives windows at random offsets; with eos_id, batches also carry
    per-document segment ids and positions (document_segments), so attention
    stays inside each document. A packed file (rows of seq_len + 1 tokens)
    gives random rows as packed_batch does, with eos_id standing for
    data.document_mask (the stored segment ids mark the documents)."""

    def __init__(self, token_file: TokenFile | str, seq_len: int, global_batch_size: int,
                 seed: int, eos_id: int | None = None):
        self.token_file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_non_negative("seed", seed)
        row_len = self.token_file.row_len
        if row_len is not None and row_len != seq_len + 1:
            raise DataError(f"{self.token_file.bin_path} holds rows packed for seq_len "
                            f"{row_len - 1}, not {seq_len}: set data.seq_len={row_len - 1} or "
                            f"prepare the data with --seq-len {seq_len}")
        if self.token_file.num_tokens < seq_len + 1:
            raise ValueError(f"{self.token_file.bin_path} holds {self.token_file.num_tokens} tokens, "
                             f"fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.eos_id = eos_id

    @property
    def num_offsets(self) -> int:
        """Number of distinct windows: start positions of a stream, or rows."""
        if self.token_file.row_len is not None:
            return self.token_file.num_tokens // self.token_file.row_len
        return self.token_file.num_tokens - self.seq_len

    def _windows(self, offsets: np.ndarray) -> dict:
        tf = self.token_file
        if tf.row_len is not None:
            rows = lambda a: a.reshape(-1, tf.row_len)[offsets].astype(np.int32)
            return packed_batch(rows(tf.tokens), rows(tf.segment_ids), self.eos_id is not None)
        idx = offsets[:, None] + np.arange(self.seq_len + 1)
        window = tf.tokens[idx].astype(np.int32)
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
