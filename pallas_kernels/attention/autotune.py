"""Autotuning of the Hopper flash-attention kernels: times candidate block
sizes and backward plans on the current GPU and writes the fastest into that
device kind's entries of the tuning table (``tuning.py``).

    python -m pallas_kernels.attention.autotune [--out PATH] [--shape B,S,H,KH,D,causal ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.attention import bench, mosaic_gpu
from pallas_kernels.attention.tuning import (DEFAULTS, TABLE_PATH, KernelBlocks, load_table,
                                             table_key)


def candidates(head_dim: int):
    """(forward, backward) configurations worth timing; the two are tuned
    separately. Ones that do not fit in shared memory fail fast and are skipped."""
    fwd_kv = {64: (128, 192, 256), 128: (128,), 256: (64,)}[head_dim]
    fwd = [dict(fwd=KernelBlocks(64, kv, 2), pingpong=pp)
           for kv, pp in itertools.product(fwd_kv, (True, False))]
    if head_dim == 256:  # deeper rings do not fit
        bwd = [dict(dq=KernelBlocks(64, 64, a), dkv=KernelBlocks(64, 64, b))
               for a, b in itertools.product((2, 1), (2, 1))]
    else:
        # Every plan of this head dim but fused_dv_pass at 64, whichever the
        # defaults use; two-kernel tilings that leave no room for the dQ
        # kernel's O tile fail fast.
        bwd = [dict(dq=KernelBlocks(64, kv, 2), dkv=KernelBlocks(64, 64, s), backward=plan)
               for kv, s in ((64, 2), (128, 2), (128, 3))
               for plan in ("two_kernels", "two_kernels_xla_delta")]
        bwd += [dict(backward="fused")]
        if head_dim == 128:
            bwd += [dict(backward="fused_dv_pass")]
    return fwd, bwd


def autotune(out_path=TABLE_PATH, shapes=None, verbose=True):
    """Times each candidate on the current GPU (bfloat16, B4 S4096 by default)
    and writes the fastest into this device kind's table entries."""
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
    parser.add_argument("--out", type=pathlib.Path, default=TABLE_PATH)
    parser.add_argument("--shape", action="append", type=_parse_shape,
                        help="B,S,H,KH,D,causal to tune (repeatable); default: B4 S4096 "
                             "H16 for each head dim, causal and not")
    args = parser.parse_args(argv)
    autotune(args.out, shapes=args.shape)


if __name__ == "__main__":
    main()
