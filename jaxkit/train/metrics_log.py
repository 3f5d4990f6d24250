"""Metrics sink: one JSON line per record plus TensorBoard event files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _scalars(prefix: str, tree, out: dict) -> dict:
    """Flattens nested metric dicts to 'a/b/c' scalars; vectors become '/i' entries."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _scalars(f"{prefix}/{k}" if prefix else str(k), v, out)
        return out
    arr = np.asarray(tree)
    if arr.ndim == 0:
        out[prefix] = float(arr)
    else:
        for i, v in enumerate(arr.reshape(-1)):
            out[f"{prefix}/{i}"] = float(v)
    return out


class MetricsLogger:
    """Writes only on the logging process (process 0 in multi-host runs)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict) -> dict:
        flat = _scalars("", metrics, {})
        if self.enabled:
            record = {"step": step, "split": split,
                      **{k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            for k, v in flat.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
        return flat

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
