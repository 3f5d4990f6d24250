"""Timing and error helpers shared by the kernels' benchmark scripts."""
from __future__ import annotations

import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp


def time_fn(f, *args, warmup: int = 3, iters: int = 15, calls: int = 5) -> float:
    """Median seconds per call of a jitted ``f``. Each sample runs ``calls``
    calls back to back and waits for the last, so host dispatch overlaps
    device work as in a real training step."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


@jax.jit
def _rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.where(jnp.isfinite(x).all(), jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref), jnp.nan)


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float32; NaN when x has a non-finite value."""
    return float(_rel_err(x, ref))


def write_rows(path: str, header: str, rows: list) -> None:
    """A bench's result rows as JSON at path, with its header line and the time."""
    with open(path, "w") as fh:
        json.dump(dict(header=header, date=datetime.datetime.now().isoformat(), rows=rows),
                  fh, indent=1, default=str)
