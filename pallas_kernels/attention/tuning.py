"""Block sizes of the Hopper flash-attention kernels, per device kind.

The table lives in ``tuning_table.json`` beside this module: for each device
kind, entries keyed ``d{head_dim}-{causal|full}``. Devices or head dims missing
from it fall back to ``DEFAULTS``, chosen to fit shared memory and registers.

``python -m pallas_kernels.attention.tuning --autotune`` times candidate block
sizes on the current GPU and rewrites that device's entries.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    fwd: KernelBlocks
    dq: KernelBlocks
    dkv: KernelBlocks
    pingpong: bool = True  # forward: the two consumers take turns on the tensor cores

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d):
        return cls(fwd=KernelBlocks(**d["fwd"]), dq=KernelBlocks(**d["dq"]),
                   dkv=KernelBlocks(**d["dkv"]), pingpong=bool(d.get("pingpong", True)))


def _kb(q, kv, s):
    return KernelBlocks(block_q=q, block_kv=kv, stages=s)


# Sized for 227 KiB of shared memory and 232 registers per consumer thread.
DEFAULTS = {
    64: BlockSizes(fwd=_kb(64, 128, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2)),
    128: BlockSizes(fwd=_kb(64, 128, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2)),
    256: BlockSizes(fwd=_kb(64, 64, 2), dq=_kb(64, 64, 1), dkv=_kb(64, 64, 1)),
}


def table_key(head_dim: int, causal: bool) -> str:
    return f"d{head_dim}-{'causal' if causal else 'full'}"


def load_table(path=TABLE_PATH) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def block_sizes_for(device_kind: str, head_dim: int, causal: bool, table=None) -> BlockSizes:
    """Tuned block sizes for this device and problem, else the defaults."""
    table = load_table() if table is None else table
    entry = table.get(device_kind, {}).get(table_key(head_dim, causal))
    if entry is not None:
        return BlockSizes.from_json(entry)
    if head_dim not in DEFAULTS:
        raise ValueError(f"no block sizes for head_dim={head_dim}; supported: {sorted(DEFAULTS)}")
    return DEFAULTS[head_dim]


def candidates(head_dim: int):
    """Configurations worth timing: forward and backward are tuned separately."""
    base = DEFAULTS[head_dim]
    kv_opts = (64, 128) if head_dim == 256 else (64, 128, 192)
    fwd = [(_kb(64, kv, s), pp) for kv, s, pp in itertools.product(kv_opts, (1, 2, 3), (True, False))]
    dq = [_kb(64, kv, s) for kv, s in itertools.product((64, 128), (1, 2, 3))]
    dkv = [_kb(q, 64, s) for q, s in itertools.product((64, 128), (1, 2, 3))]
    return base, fwd, dq, dkv


def autotune(out_path=TABLE_PATH, shapes=None, verbose=True):
    """Times each candidate on the current GPU; keeps the fastest that runs and
    is correct; writes this device kind's entries into the table."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import compat
    from pallas_kernels.attention import bench, mosaic_gpu

    kind = compat.device_kind()
    shapes = shapes or [(4, 4096, 16, 16, d, c) for d in (64, 128, 256) for c in (True, False)]
    table = load_table(out_path)
    entries = table.setdefault(kind, {})
    for (B, S, H, KH, D, causal) in shapes:
        base, fwd_c, dq_c, dkv_c = candidates(D)
        q, k, v = bench.random_inputs(jax.random.key(D + causal), B, S, S, H, KH, D, jnp.bfloat16)

        def fwd_time(bs):
            f = jax.jit(lambda q, k, v: mosaic_gpu.mosaic_flash_attention(
                q, k, v, causal=causal, block_sizes=bs))
            return bench.time_fn(f, q, k, v)

        def bwd_time(bs):
            g = jax.jit(jax.grad(lambda q, k, v: mosaic_gpu.mosaic_flash_attention(
                q, k, v, causal=causal, block_sizes=bs).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
            return bench.time_fn(g, q, k, v)

        def best(cands, make, timer):
            scores = []
            for c in cands:
                try:
                    t = timer(make(c))
                except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                    if verbose:
                        print(f"  {c}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    continue
                if verbose:
                    print(f"  {c}: {t * 1e3:.3f} ms")
                scores.append((t, c))
            return min(scores, key=lambda x: x[0])[1] if scores else None

        print(f"== {kind} B{B} S{S} H{H} D{D} causal={causal}")
        fwd = best(fwd_c, lambda c: dataclasses.replace(base, fwd=c[0], pingpong=c[1]), fwd_time)
        fwd_bs = base if fwd is None else dataclasses.replace(base, fwd=fwd[0], pingpong=fwd[1])
        dq = best(dq_c, lambda c: dataclasses.replace(fwd_bs, dq=c), bwd_time) or base.dq
        dkv = best(dkv_c, lambda c: dataclasses.replace(fwd_bs, dq=dq, dkv=c), bwd_time) or base.dkv
        chosen = dataclasses.replace(fwd_bs, dq=dq, dkv=dkv)
        entries[table_key(D, causal)] = chosen.to_json()
        print(f"   chosen: {chosen}")
    out_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--autotune", action="store_true",
                        help="time candidate block sizes on this GPU and rewrite the table")
    parser.add_argument("--out", type=pathlib.Path, default=TABLE_PATH)
    args = parser.parse_args(argv)
    if args.autotune:
        autotune(args.out)
    else:
        print(json.dumps(load_table(args.out), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
