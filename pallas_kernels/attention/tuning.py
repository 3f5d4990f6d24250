"""Block sizes and backward plan of the Hopper flash-attention kernels, per device kind.

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
class BlockSizes:
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
    64: BlockSizes(fwd=_kb(64, 128, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2), backward="fused"),
    128: BlockSizes(fwd=_kb(64, 128, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2), backward="fused"),
    256: BlockSizes(fwd=_kb(64, 64, 2), dq=_kb(64, 64, 2), dkv=_kb(64, 64, 2),
                    backward="role_split"),
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
    """(forward, backward) configurations worth timing; the two are tuned
    separately. Ones that do not fit in shared memory fail fast and are skipped."""
    fwd_kv = {64: (128, 192, 256), 128: (128,), 256: (64,)}[head_dim]
    fwd = [dict(fwd=_kb(64, kv, 2), pingpong=pp) for kv, pp in itertools.product(fwd_kv, (True, False))]
    if head_dim == 256:
        bwd = [dict(dq=_kb(64, 64, a), dkv=_kb(64, 64, b))  # deeper rings do not fit
               for a, b in itertools.product((2, 1), (2, 1))]
    else:
        # Every plan of this head dim but fused_dv_pass at 64, whichever the
        # defaults use; two-kernel tilings that leave no room for the dQ
        # kernel's O tile fail fast.
        bwd = [dict(dq=_kb(64, kv, 2), dkv=_kb(64, 64, s), backward=plan)
               for kv, s in ((64, 2), (128, 2), (128, 3))
               for plan in ("two_kernels", "two_kernels_xla_delta")]
        bwd += [dict(backward="fused")]
        if head_dim == 128:
            bwd += [dict(backward="fused_dv_pass")]
    return fwd, bwd


def autotune(out_path=TABLE_PATH, shapes=None, verbose=True):
    """Times each candidate on the current GPU (bfloat16, B4 S4096 by default)
    and writes the fastest into this device kind's table entries."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import compat
    from pallas_kernels.attention import bench, mosaic_gpu

    kind = compat.device_kind()
    shapes = shapes or [(4, 4096, 16, 16, d, c) for d in (64, 128, 256) for c in (True, False)]
    table = load_table(out_path)
    entries = table.setdefault(kind, {})
    for (B, S, H, KH, D, causal) in shapes:
        q, k, v = bench.random_inputs(jax.random.key(D + causal), B, S, S, H, KH, D, jnp.bfloat16)

        def forward(bs):
            return jax.jit(lambda q, k, v: mosaic_gpu.mosaic_flash_attention(
                q, k, v, causal=causal, block_sizes=bs))

        def forward_backward(bs):
            loss = lambda q, k, v: mosaic_gpu.mosaic_flash_attention(
                q, k, v, causal=causal, block_sizes=bs).astype(jnp.float32).sum()
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

        def fastest(base, changes, make):
            """Fastest of base updated by each change whose result matches base's."""
            want = jax.tree.leaves(make(base)(q, k, v))
            best = None
            for change in changes:
                bs = dataclasses.replace(base, **change)
                try:
                    f = make(bs)
                    got = jax.tree.leaves(f(q, k, v))
                    err = max(float(jnp.linalg.norm((g - w).astype(jnp.float32)) /
                                    jnp.linalg.norm(w.astype(jnp.float32)))
                              for g, w in zip(got, want))
                    if not err < 2e-2:
                        raise ValueError(f"result differs from the default's (rel err {err:.2e})")
                    t = bench.time_fn(f, q, k, v)
                except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                    if verbose:
                        print(f"  {change}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    continue
                if verbose:
                    print(f"  {change}: {t * 1e3:.3f} ms", flush=True)
                if best is None or t < best[0]:
                    best = (t, bs)
            return base if best is None else best[1]

        print(f"== {kind} B{B} S{S} H{H} KH{KH} D{D} causal={causal}", flush=True)
        fwd_c, bwd_c = candidates(D)
        chosen = fastest(DEFAULTS[D], fwd_c, forward)
        chosen = fastest(chosen, bwd_c, forward_backward)
        entries[table_key(D, causal)] = chosen.to_json()
        print(f"   chosen: {chosen}", flush=True)
        out_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def _parse_shape(text):
    """'B,S,H,KH,D,causal' e.g. '4,4096,16,16,128,1'."""
    B, S, H, KH, D, causal = (int(x) for x in text.split(","))
    return B, S, H, KH, D, bool(causal)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--autotune", action="store_true",
                        help="time candidate block sizes on this GPU and rewrite the table")
    parser.add_argument("--out", type=pathlib.Path, default=TABLE_PATH)
    parser.add_argument("--shape", action="append", type=_parse_shape,
                        help="B,S,H,KH,D,causal to tune (repeatable); default: B4 S4096 "
                             "H16 for each head dim, causal and not")
    args = parser.parse_args(argv)
    if args.autotune:
        autotune(args.out, shapes=args.shape)
    else:
        print(json.dumps(load_table(args.out), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
