"""Global batches from per-process data.

Each process loads only the rows its devices hold: the batch is split over
the rules' "batch" mesh axes, and the process asks the data source for its
block with (process_index, process_count) measured in those row blocks, not
in processes: processes whose devices hold the same rows (e.g. a tensor axis
spanning hosts) load the same block."""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxkit.config import ConfigError
from jaxkit.sharding.rules import MeshAxes, logical_to_spec, mesh_axes


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes]) -> NamedSharding:
    """Rows split over the batch axes, other dims whole, for arrays of any rank
    (inputs are small integer arrays; the model's first constraint splits the
    sequence)."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, what="batch"))


def batch_shards(mesh: Mesh, rules) -> int:
    """Number of row blocks the batch is split into."""
    return math.prod(mesh.shape[a] for a in mesh_axes("batch", rules, mesh))


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh, rules) -> None:
    shards = batch_shards(mesh, rules)
    micro = global_batch // grad_accum
    if micro % shards:
        raise ConfigError(f"data.batch_size ({global_batch}) / train.grad_accum ({grad_accum}) = "
                          f"{micro} sequences per micro-batch is not divisible by the {shards} "
                          f"batch shards of the mesh ({dict(mesh.shape)})")


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """(block_index, block_count): this process's devices hold rows
    [i * B/n, (i+1) * B/n) of the global batch."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        s = index[0]
        rows.update(range(*s.indices(global_batch)))
    lo, size = min(rows), len(rows)
    if rows != set(range(lo, lo + size)) or global_batch % size or lo % size:
        raise ConfigError(f"process {jax.process_index()} holds batch rows {sorted(rows)}, not one "
                          f"aligned block; order the mesh so each process's devices are adjacent "
                          f"along the batch axes")
    return lo // size, global_batch // size


class GlobalBatcher:
    """Turns a data source's per-process slice into global jax.Arrays."""

    def __init__(self, mesh: Mesh, rules, global_batch: int):
        self.sharding, self.global_batch = batch_sharding(mesh, rules), global_batch
        self.index, self.count = process_rows(self.sharding, global_batch)

    def __call__(self, source, step: int) -> dict:
        local = source.batch(step, process_index=self.index, process_count=self.count)
        out = {}
        for name, value in local.items():
            value = np.asarray(value)
            if value.shape[0] * self.count != self.global_batch:
                raise ValueError(f"data source gave {value.shape[0]} rows of {name!r} for block "
                                 f"{self.index}/{self.count} of a global batch of "
                                 f"{self.global_batch}")
            out[name] = jax.make_array_from_process_local_data(
                self.sharding, value, (self.global_batch, *value.shape[1:]))
        return out
