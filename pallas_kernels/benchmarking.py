"""Timing and error helpers shared by the kernels' benchmark scripts."""
from __future__ import annotations

import datetime
import glob
import json
import os
import statistics
import tempfile
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


def device_kernel_seconds(f, *args, calls: int = 3) -> dict:
    """{GPU kernel name: [seconds of each launch]} over ``calls`` calls of a
    jitted ``f`` (after a warm-up), from a jax.profiler trace: the kernels'
    device time alone, without the host dispatch and the gaps between launches
    that a wall-clock time per call includes."""
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
        return kernel_seconds(jax.profiler.ProfileData.from_file(paths[0]))


def kernel_seconds(profile) -> dict:
    """{kernel name: [seconds]} of the launches on the GPU streams of a
    ``jax.profiler.ProfileData`` (planes "/device:GPU:n", lines "Stream ...")."""
    times, lines = {}, []
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines.append(line.name)
            if line.name.startswith("Stream"):
                for event in line.events:
                    times.setdefault(event.name, []).append(event.duration_ns * 1e-9)
    if not times:
        raise RuntimeError(f"no GPU kernel launches in the trace (GPU lines: {lines})")
    return times


@jax.jit
def _rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.where(jnp.isfinite(x).all(), jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref), jnp.nan)


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float32; NaN when x has a non-finite value."""
    return float(_rel_err(x, ref))


def measure_each(keys, measure, format_table, meta: dict, json_path: str | None = None) -> dict:
    """{key: measure(key)} for each key in turn. Each key's rows of
    format_table({key: result}) (its header line dropped) are printed when
    measured and, with json_path, {"meta": meta, "results": ...} is written
    there after every key, so a cut-off run keeps what it measured; the
    whole table is printed at the end."""
    results = {}
    for key in keys:
        results[key] = measure(key)
        print("\n".join(format_table({key: results[key]}).splitlines()[1:]), flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    print(format_table(results))
    return results


def write_rows(path: str, header: str, rows: list) -> None:
    """A bench's result rows as JSON at path, with its header line and the time."""
    with open(path, "w") as fh:
        json.dump(dict(header=header, date=datetime.datetime.now().isoformat(), rows=rows),
                  fh, indent=1, default=str)
