"""Block sizes and backward plan of the Hopper flash-attention kernels, per device kind.

The table lives in ``tuning_table.json`` beside this module: for each device
kind, entries keyed ``d{head_dim}-{causal|full}``. Devices or head dims missing
from it fall back to ``DEFAULTS``, chosen to fit shared memory and registers.

``python -m pallas_kernels.attention.autotune`` times candidate block sizes
and backward plans on the current GPU and rewrites that device's entries.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

TABLE_PATH = pathlib.Path(__file__).with_name("tuning_table.json")


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """One kernel's tiling. Each of the two consumer warpgroups owns ``block_q``
    query rows (forward, dq) or ``block_kv`` key rows (dk/dv); the other block
    is what one pipeline step streams through shared memory, ``stages`` deep."""
    block_q: int
    block_kv: int
    stages: int

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64 or self.block_q <= 0 or self.block_kv <= 0:
            raise ValueError(f"block sizes must be positive multiples of 64, got {self}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


# How the backward kernels compose, by name, and the head dims each takes.
# delta = rowsum(dO*O) comes from XLA (one more pass over O and dO) unless the
# plan's dQ kernel forms it.
BACKWARD_HEAD_DIMS = {
    # A dQ kernel (query-parallel) that forms delta from an O tile in shared
    # memory, then a dK/dV kernel (key-parallel): 7 matrix products a step.
    "two_kernels": (64, 128),
    # The same two kernels with delta from XLA, for dQ tilings that leave no
    # shared memory for the O tile.
    "two_kernels_xla_delta": (64, 128),
    # head_dim 256: one consumer can hold neither the dK and dV accumulators
    # nor two stages of K/V beside its Q and dO tiles, so both kernels give
    # their two consumers the same rows and split each step by role.
    "role_split": (256,),
    # dQ formed inside the dK/dV kernel: 5 matrix products a step.
    "fused": (64, 128),
    # dK and dQ in one kernel, dV in a second, lighter key-parallel pass (S^T
    # and dV only), so the fused pass keeps no dV accumulator in registers:
    # 6 matrix products a step.
    "fused_dv_pass": (64, 128),
}


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """Tiling of the Mosaic GPU kernels (forward, dQ, dK/dV) and the backward
    plan that composes them; the portable kernel's are ``PortableBlockSizes``."""
    fwd: KernelBlocks
    dq: KernelBlocks
    dkv: KernelBlocks
    backward: str  # the backward plan, a key of BACKWARD_HEAD_DIMS
    pingpong: bool = True  # forward: the two consumers take turns on the tensor cores

    def __post_init__(self):
        if self.backward not in BACKWARD_HEAD_DIMS:
            raise ValueError(f"unknown backward plan {self.backward!r}; choose one of "
                             f"{tuple(BACKWARD_HEAD_DIMS)}")

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d):
        if "backward" not in d:
            raise ValueError(f"tuning table entry names no backward plan: {d}")
        return cls(fwd=KernelBlocks(**d["fwd"]), dq=KernelBlocks(**d["dq"]),
                   dkv=KernelBlocks(**d["dkv"]), backward=d["backward"],
                   pingpong=bool(d.get("pingpong", True)))


def _kb(q, kv, s):
    return KernelBlocks(block_q=q, block_kv=kv, stages=s)


# Sized for 227 KiB of shared memory and 240 (forward, fused backward) or 232
# (separate dQ and dK/dV kernels) registers per consumer thread.
# head_dim 64 and 128 take the fused backward: at 64 it is 12% faster than the
# two kernels (causal and full, H200); at 128 it is what the H200's tuned
# entries pick, causal and full. head_dim 256's role-split dQ and dK/dV kernels
# take two stages each: with one, forward+backward on the H200 was 9-15%
# slower (dK/dV) and 12-19% slower (dQ).
DEFAULTS = {
    64: MosaicBlockSizes(fwd=_kb(64, 128, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2),
                         backward="fused"),
    128: MosaicBlockSizes(fwd=_kb(64, 128, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2),
                          backward="fused"),
    256: MosaicBlockSizes(fwd=_kb(64, 64, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2),
                          backward="role_split"),
}


def table_key(head_dim: int, causal: bool) -> str:
    return f"d{head_dim}-{'causal' if causal else 'full'}"


def load_table(path=TABLE_PATH) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def block_sizes_for(device_kind: str, head_dim: int, causal: bool, table=None) -> MosaicBlockSizes:
    """Tuned block sizes for this device and problem, else the defaults."""
    table = load_table() if table is None else table
    entry = table.get(device_kind, {}).get(table_key(head_dim, causal))
    if entry is not None:
        return MosaicBlockSizes.from_json(entry)
    if head_dim not in DEFAULTS:
        raise ValueError(f"no block sizes for head_dim={head_dim}; supported: {sorted(DEFAULTS)}")
    return DEFAULTS[head_dim]
