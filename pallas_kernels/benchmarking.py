"""Timing and error helpers shared by the kernels' benchmark scripts."""
from __future__ import annotations

import argparse
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


def short_error(e: Exception) -> str:
    """An exception as one short line for a benchmark table."""
    text = str(e).strip().splitlines()[0][:90] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"


def copy_gb_per_s(shape, dtype, iters: int) -> float:
    """GB/s of x + 1 over one array of ``shape`` (bytes read and written)."""
    a = jnp.ones(shape, dtype)
    return 2 * a.nbytes / time_fn(jax.jit(lambda a: a + jnp.asarray(1, dtype)), a,
                                  iters=iters) / 1e9


def parse_dims(text: str, count: int) -> tuple[int, ...]:
    """'AxB...' -> ``count`` positive ints; anything else raises ValueError."""
    dims = tuple(int(n) for n in text.split("x"))
    if len(dims) != count or min(dims) < 1:
        raise ValueError(f"{text!r}: expected {count} positive sizes joined by 'x'")
    return dims


def shapes_main(doc: str, argv, *, default_shapes: list[str], dims_help: str, bench_shape,
                format_table, dtype) -> dict:
    """The command line of a benchmark over shapes 'AxB...': --shapes,
    --implementations, --iters and --json; bench_shape(*dims,
    implementations, iters) measures one shape."""
    count = len(dims_help.split("x"))

    def shapes(text):
        out = [s for s in text.split(",") if s]
        for s in out:
            parse_dims(s, count)  # refuses a malformed one while parsing the arguments
        return out

    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--shapes", type=shapes, default=default_shapes, help=f"{dims_help},...")
    parser.add_argument("--implementations", default="xla,pallas")
    parser.add_argument("--iters", type=int, default=15, help="timed samples per call")
    args = parser.parse_args(argv)
    implementations = [i for i in args.implementations.split(",") if i]
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "dtype": jnp.dtype(dtype).name,
            "implementations": implementations}
    print(meta, flush=True)
    return measure_each(args.shapes, lambda s: bench_shape(*parse_dims(s, count), implementations,
                                                           args.iters),
                        format_table, meta, args.json)
