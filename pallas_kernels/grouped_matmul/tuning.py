"""Tilings of the two-consumer grouped-matmul kernels, per device kind and shape.

The table lives in ``tuning_table.json`` beside this module: for each device
kind, entries keyed ``{kernel}-{schedule}-k{K}-n{N}`` holding a tiling
(rows, K, N). kernel: ``gmm`` (lhs [M, K] times rhs [G, K, N]), ``gmm_t``
(the same with rhs given as [G, N, K]: gmm's d-lhs) or ``tgmm`` (output
[G, K, N]); schedule: ``split`` (each item split between the two consumers)
or ``pingpong`` (whole items in turn, gmm only). Shapes or devices missing
from the table take the kernels' defaults (two_consumers.py).

``python -m pallas_kernels.grouped_matmul.bench --consumers --write-table``
times candidate tilings on the current GPU at moe_1b's shapes and rewrites
that device's entries with the fastest of each.
"""
from __future__ import annotations

import functools
import json
import pathlib

TABLE_PATH = pathlib.Path(__file__).with_name("tuning_table.json")
KERNELS = ("gmm", "gmm_t", "tgmm")
SCHEDULES = ("split", "pingpong")


def table_key(kernel: str, schedule: str, k: int, n: int) -> str:
    if kernel not in KERNELS or schedule not in SCHEDULES:
        raise ValueError(f"no tuning key for kernel {kernel!r} with schedule {schedule!r}")
    return f"{kernel}-{schedule}-k{k}-n{n}"


@functools.lru_cache(maxsize=None)
def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_table(path=None) -> dict:
    return _load(pathlib.Path(path or TABLE_PATH))


def tiling_for(device_kind: str, kernel: str, schedule: str, k: int, n: int,
               table=None) -> tuple[int, int, int] | None:
    """The tuned tiling of this kernel and shape on this device, or None (the
    kernel's default)."""
    table = load_table() if table is None else table
    entry = table.get(device_kind, {}).get(table_key(kernel, schedule, k, n))
    return None if entry is None else tuple(entry["tiling"])


def write_entries(device_kind: str, entries: dict, path=None) -> None:
    """Merge {table_key: tiling} into the device's entries of the table file."""
    path = pathlib.Path(path or TABLE_PATH)
    table = {kind: dict(device) for kind, device in load_table(path).items()}  # the cache's is shared
    table.setdefault(device_kind, {}).update(
        {key: {"tiling": list(t)} for key, t in entries.items()})
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _load.cache_clear()
