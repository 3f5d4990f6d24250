"""Metrics sink: one JSON line per record plus TensorBoard event files."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np


def _flatten(prefix: str, tree, scalars: dict, vectors: dict) -> None:
    """Nested metric dicts -> 'a/b/c' scalars, and arrays (per-expert loads,
    say) kept whole as vectors."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, scalars, vectors)
        return
    arr = np.asarray(tree)
    if arr.ndim == 0:
        scalars[prefix] = float(arr)
    else:
        vectors[prefix] = arr.reshape(-1).astype(float)


def _json_value(v: float):
    return v if math.isfinite(v) else str(v)


class MetricsLogger:
    """Writes only on the logging process (process 0 in multi-host runs)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                # Offline cluster images may lack it; the JSONL still has every record.
                warnings.warn("tensorboardX is not installed: metrics go to metrics.jsonl only "
                              "(pip install tensorboardX for TensorBoard event files)")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict) -> dict:
        """Writes one record; returns its scalars. A vector is one JSON list
        and one TensorBoard histogram, not a scalar per element."""
        flat, vectors = {}, {}
        _flatten("", metrics, flat, vectors)
        if self.enabled:
            record = {"step": step, "split": split,
                      **{k: _json_value(v) for k, v in flat.items()},
                      **{k: [_json_value(x) for x in v] for k, v in vectors.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for k, v in flat.items():
                    self._tb.add_scalar(f"{split}/{k}", v, step)
                for k, v in vectors.items():
                    self._tb.add_histogram(f"{split}/{k}", v, step)
        return flat

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
