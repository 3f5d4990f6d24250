"""Multi-query associative recall (MQAR), the synthetic recall task of the
Zoology and Based papers.

Each sequence opens with key-value pairs `k1 v1 k2 v2 ...`; later, some of
those keys reappear as queries, each immediately followed by its value. The
loss counts only the predictions made at a query key, whose target is the
value paired with that key in the context. Keys and values come from disjoint
halves of the vocabulary; token 0 fills the gaps between queries.

Each query picks its pair independently (`repeat_queries`, the default: a
pair may be asked twice, another never), so only recall scores. With
repeat_queries=False every pair is asked at most once, in random order: then
the last queries can be answered without recall, by elimination (the values
not yet asked for), and a model that learns only that reaches H_n / n
accuracy with n pairs asked (0.52 at 4, 0.34 at 8, 0.13 at 32) without
binding any key to its value.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkit.data.batches import _check_non_negative, process_slice

FILL = 0


def _random_subsets(rng: np.random.Generator, rows: int, population: int, size: int) -> np.ndarray:
    """`size` distinct values from [0, population) per row, in random order."""
    return np.argsort(rng.random((rows, population)), axis=1)[:, :size]


class MQARTask:
    def __init__(self, vocab_size: int, seq_len: int, num_kv_pairs: int, seed: int,
                 global_batch_size: int, num_queries: int | None = None,
                 repeat_queries: bool = True):
        num_queries = num_kv_pairs if num_queries is None else num_queries
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                            ("num_kv_pairs", num_kv_pairs), ("global_batch_size", global_batch_size),
                            ("num_queries", num_queries)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_non_negative("seed", seed)
        self.key_range = (1, vocab_size // 2)
        self.value_range = (vocab_size // 2, vocab_size)
        num_keys = self.key_range[1] - self.key_range[0]
        if num_kv_pairs > num_keys:
            raise ValueError(f"num_kv_pairs={num_kv_pairs} needs as many distinct keys, but "
                             f"vocab_size={vocab_size} offers only {max(num_keys, 0)} "
                             f"(keys are ids {self.key_range[0]}..{self.key_range[1] - 1})")
        if num_queries > num_kv_pairs and not repeat_queries:
            raise ValueError(f"num_queries={num_queries} exceeds num_kv_pairs={num_kv_pairs}: "
                             f"each key is queried at most once (repeat_queries=False)")
        # The context takes 2 tokens per pair, each query 2 (key, then value);
        # the final value is a target only, hence the + 1.
        needed = 2 * num_kv_pairs + 2 * num_queries
        if needed > seq_len + 1:
            raise ValueError(f"seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs} and "
                             f"num_queries={num_queries}: needs seq_len >= {needed - 1}")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_kv_pairs, self.num_queries = num_kv_pairs, num_queries
        self.repeat_queries = repeat_queries
        self.global_batch_size = global_batch_size

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        """inputs/targets int32[b, seq_len] and loss_mask float32[b, seq_len],
        1 exactly where the input is a query key and the target its value."""
        _check_non_negative("step", step)
        rows = process_slice(self.global_batch_size, process_index, process_count)
        b, n, q = self.global_batch_size, self.num_kv_pairs, self.num_queries
        rng = np.random.default_rng((self.seed, step))
        keys = self.key_range[0] + _random_subsets(rng, b, self.key_range[1] - self.key_range[0], n)
        values = rng.integers(*self.value_range, size=(b, n))
        # which pairs are asked, in order
        queried = rng.integers(0, n, (b, q)) if self.repeat_queries else _random_subsets(rng, b, n, q)
        # Query starts after the context: adding i to the i-th of q sorted
        # distinct draws from [0, free - q) spaces them >= 2 apart, so the
        # 2-token slots never overlap and the last value lands at most at seq_len.
        free = self.seq_len + 1 - 2 * n
        starts = 2 * n + np.sort(_random_subsets(rng, b, free - q, q), axis=1) + np.arange(q)
        seq = np.full((b, self.seq_len + 1), FILL, np.int32)
        seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
        r = np.arange(b)[:, None]
        seq[r, starts] = np.take_along_axis(keys, queried, axis=1)
        seq[r, starts + 1] = np.take_along_axis(values, queried, axis=1)
        mask = np.zeros((b, self.seq_len), np.float32)
        mask[r, starts] = 1.0
        return {"inputs": seq[rows, :-1], "targets": seq[rows, 1:], "loss_mask": mask[rows]}


def mqar_accuracy(logits, targets, loss_mask):
    """Fraction of masked positions whose argmax prediction is the target
    (a jax scalar; usable under jit)."""
    if logits.shape[:-1] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"shapes disagree: logits {logits.shape} (expects [..., vocab]), "
                         f"targets {targets.shape}, loss_mask {loss_mask.shape}")
    mask = jnp.asarray(loss_mask, jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets) * mask
    return correct.sum() / jnp.maximum(mask.sum(), 1.0)
