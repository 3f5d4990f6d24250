"""Decode-attention benchmark: achieved HBM bandwidth of each implementation
against a device copy measured in the same run.

    python -m pallas_kernels.decode_attention.bench [--json PATH] [--quick]
        [--batches 1,8,64] [--lengths 4096,16384,32768] [--format bf16|int8|fp8]
        [--page-size N] [--impls a,b] [--block-kv N] [--num-splits N] [--device-time]
    python -m pallas_kernels.decode_attention.bench --table RESULTS.json   # -> BENCHMARKS table

Shapes: batch 1, 8, 64 x cache 4k, 16k, 32k slots, every slot in use, one
new token (T=1), Hq 32 / Hkv 8 / head_dim 128 (Llama-3-8B's attention), bf16
queries; the cache bf16, or int8 / fp8 codes with float32 scales (--format),
contiguous or paged (--page-size, pages in order). Implementations: 'xla'
(the jitted reference), 'cudnn' (jax.nn.dot_product_attention, contiguous
bf16 caches only), 'blockspec' and 'mosaic_gpu' (the Pallas kernels), and
'mosaic_splits': the Hopper kernel on flash-decoding's splits (each block
one split of one (sequence, head) pair; the portable kernel's default split
count) instead of its default stream-K ranges.

Bytes: q and the output once plus every cache token's codes and scales
(reference.decode_bytes). Each call is timed as a decode step runs its
layers (quant_matmul.bench.chained_time): one jit chains calls over enough
distinct caches to stream at least 512 MiB between two visits of the same
one (no L2 reuse), each call's output the next call's query, and passes over
them until the chain has streamed 2 GiB (one call where a cache is larger). The copy is a
512 MiB bf16 array read and written (quant_matmul.bench.copy_bandwidth). Each
shape also times an XLA sum reading as many bytes (quant_matmul.bench.read_seconds):
where a call moves tens of MB, launch and ramp-up rival the transfer, and
this is the floor they set. --table turns a --json file into a table for
benchmarks/results/decode_attention.json (benchmarks/render.py's schema).
--device-time adds each call's device time from a profiler trace (the
kernels alone, without the host's dispatch) and lists its kernels. Every
implementation is checked against the reference (or, where the reference
would not fit, against the portable kernel) before it is timed; failures are
printed in the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.benchmarking import rel_err
from pallas_kernels.decode_attention import mosaic_gpu
from pallas_kernels.decode_attention.api import decode_attention
from pallas_kernels.decode_attention.kv_formats import QuantizedKV, quantize_kv
from pallas_kernels.decode_attention.reference import decode_bytes
from pallas_kernels.decode_attention.splits import default_splits
from pallas_kernels.quant_matmul.bench import (chained_time, copy_bandwidth, read_seconds,
                                               rotated_device_time)

BATCHES = (1, 8, 64)
CACHE_LENGTHS = (4096, 16384, 32768)
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
STREAM_BYTES = 512 * 2**20   # cache bytes a chain streams before reusing a cache
CHAIN_BYTES = 2 * 2**30      # cache bytes a chained timing streams at least
REFERENCE_MAX_BYTES = 2**33  # the reference's float32 copies of larger caches are skipped
IMPLEMENTATIONS = ("xla", "cudnn", "blockspec", "mosaic_gpu", "mosaic_splits")


def make_inputs(key, batch, length, fmt, page_size, layers):
    """(q, [(k, v) per layer], lengths, page_table or None): random caches,
    every slot in use."""
    keys = jax.random.split(key, 2 * layers + 1)
    q = jax.random.normal(keys[0], (batch, 1, HEADS, HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
    shape = (batch, length, KV_HEADS, HEAD_DIM)
    page_table = None
    if page_size:
        shape = (batch * length // page_size, page_size, KV_HEADS, HEAD_DIM)
        page_table = jnp.arange(shape[0], dtype=jnp.int32).reshape(batch, -1)

    def cache(k):
        x = jax.random.normal(k, shape, jnp.float32)
        return x.astype(jnp.bfloat16) if fmt == "bf16" else quantize_kv(x, fmt)
    caches = [(cache(keys[1 + 2 * i]), cache(keys[2 + 2 * i])) for i in range(layers)]
    return q, caches, jnp.full((batch,), length, jnp.int32), page_table


def implementations(names, page_table, fmt, tiling):
    """name -> fn(q, k, v, lengths) for the implementations that apply."""
    def ours(name):
        extra = tiling if name != "xla" else {}
        return lambda q, k, v, lengths: decode_attention(
            q, k, v, lengths, page_table=page_table, implementation=name, **extra)
    impls = {}
    for name in names:
        if name == "mosaic_splits":
            impls[name] = lambda q, k, v, lengths: decode_attention(
                q, k, v, lengths, page_table=page_table, implementation="mosaic_gpu",
                **{"num_splits": flash_splits(q, k, page_table, tiling.get("block_kv")),
                   **tiling})
        elif name == "cudnn":
            if page_table is None and fmt == "bf16":
                impls[name] = lambda q, k, v, lengths: jax.nn.dot_product_attention(
                    q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
        else:
            impls[name] = ours(name)
    return impls


def flash_splits(q, k, page_table, block_kv):
    """The split count flash-decoding's default gives this call (splits.default_splits)."""
    data = k.data if isinstance(k, QuantizedKV) else k
    slots = page_table.shape[1] * data.shape[1] if page_table is not None else data.shape[1]
    tiles = -(-slots // (block_kv or mosaic_gpu.DEFAULT_BLOCK_KV))
    return default_splits(q.shape[0] * data.shape[2], tiles, compat.sm_count())


def _short(e):
    text = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"


def bench_shape(batch, length, *, fmt="bf16", page_size=None, names=IMPLEMENTATIONS,
                tiling=None, copy_gbs=None, device_time=False):
    """{implementation: result} for one shape: seconds a call (chained),
    GB/s, fraction of the copy bandwidth, relative error; or an error."""
    probe = make_inputs(jax.random.key(0), batch, length, fmt, page_size, 1)
    cache_bytes = decode_bytes(probe[0], *probe[1][0], batch * length)
    layers = max(1, -(-STREAM_BYTES // cache_bytes))
    q, caches, lengths, page_table = make_inputs(jax.random.key(0), batch, length, fmt,
                                                 page_size, layers)
    del probe
    impls = implementations(names, page_table, fmt, tiling or {})
    results, outputs = {}, {}
    for name, fn in impls.items():
        if name == "xla" and cache_bytes > REFERENCE_MAX_BYTES:
            results[name] = {"error": "skipped: the reference's float32 cache would not fit"}
            continue
        try:
            outputs[name] = jax.jit(fn)(q, *caches[0], lengths)
            results[name] = {}
        except Exception as e:  # noqa: BLE001 - reported in the table
            results[name] = {"error": _short(e)}
    trusted = next((n for n in ("xla", "blockspec") if n in outputs), None)
    arg_sets = [(q, k, v, lengths) for k, v in caches]
    repeats = max(1, -(-CHAIN_BYTES // (layers * cache_bytes)))
    for name, out in outputs.items():
        r = results[name]
        if trusted and name != trusted:
            r["rel_err_vs_" + trusted] = rel_err(out, outputs[trusted])
        try:
            r["seconds"] = chained_time(impls[name], arg_sets, repeats)
        except Exception as e:  # noqa: BLE001
            r["error"] = _short(e)
            continue
        r["gbs"] = cache_bytes / r["seconds"] / 1e9
        if copy_gbs:
            r["of_copy"] = r["gbs"] / copy_gbs
        if device_time:
            try:
                r["device_seconds"], r["kernels"] = rotated_device_time(impls[name], arg_sets)
                r["device_gbs"] = cache_bytes / r["device_seconds"] / 1e9
            except Exception as e:  # noqa: BLE001 - the wall-clock numbers stand without it
                r["device_error"] = _short(e)
    return {"bytes": cache_bytes, "layers": layers, "results": results,
            "read_seconds": read_seconds(cache_bytes, layers)}


def format_table(rows, copy_gbs):
    lines = [f"copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else "copy bandwidth not measured",
             f"{'shape':24s} {'impl':13s} {'us/call':>9s} {'GB/s':>7s} {'of copy':>7s} "
             f"{'dev GB/s':>8s}  rel err / note"]
    for shape, row in rows.items():
        if "read_seconds" in row:
            lines.append(f"{shape:24s} an XLA sum reading the same bytes: "
                         f"{row['read_seconds'] * 1e6:.1f} us")
        for name, r in row["results"].items():
            def cell(key, fmt, width):
                return format(r[key], fmt).rjust(width) if key in r else "-".rjust(width)
            us = f"{r['seconds'] * 1e6:9.1f}" if "seconds" in r else f"{'-':>9s}"
            errs = [f"{v:.1e}" for k, v in r.items() if k.startswith("rel_err")]
            note = " ".join(errs + [r.get("error", ""), r.get("device_error", "")]).strip()
            lines.append(f"{shape:24s} {name:13s} {us} {cell('gbs', '.0f', 7)} "
                         f"{cell('of_copy', '.0%', 7)} {cell('device_gbs', '.0f', 8)}  {note}")
            # where a call's device time goes: its kernels (the attention kernel,
            # the query-row layout and the split merge are separate launches)
            for kernel, (launches, seconds) in r.get("kernels", {}).items():
                lines.append(f"{'':24s}   {kernel[:44]:44s} {launches:5d} x {seconds * 1e6:7.2f} us")
    return "\n".join(lines)


READ_FLOOR = "read floor (XLA sum)"


def _command(argv) -> str:
    """The command line that reproduces this run, without where it wrote."""
    kept = [a for i, a in enumerate(argv)
            if a != "--json" and (i == 0 or argv[i - 1] != "--json") and not a.startswith("--json=")]
    return " ".join(["python -m pallas_kernels.decode_attention.bench", *kept])


def results_table(data) -> dict:
    """A bench --json file's contents as a benchmarks/results table: a row per
    shape and implementation (and the shape's read floor), wall and device
    microseconds a call, GB/s, % of the copy, error against the reference."""
    meta, rows = data["meta"], data["rows"]
    copy = meta.get("copy_gbs")
    out, names = [], set()
    for shape, row in rows.items():
        for name, r in row["results"].items():
            if "seconds" not in r:
                continue
            names.add(name)
            err = next((v for k, v in r.items() if k.startswith("rel_err")), None)
            out.append({"shape": shape, "implementation": name, "us": r["seconds"] * 1e6,
                        "device_us": r["device_seconds"] * 1e6 if "device_seconds" in r else None,
                        "gbs": round(r["gbs"]), "of_copy": round(100 * r["of_copy"])
                        if "of_copy" in r else None, "rel_err": err})
        if "read_seconds" in row:
            gbs = row["bytes"] / row["read_seconds"] / 1e9
            out.append({"shape": shape, "implementation": READ_FLOOR,
                        "us": row["read_seconds"] * 1e6, "device_us": None, "gbs": round(gbs),
                        "of_copy": round(100 * gbs / copy) if copy else None, "rel_err": None})
    cache = {"bf16": "a bf16", "int8": "an int8", "fp8": "an fp8"}[meta["format"]]
    layout = f"paged ({meta['page_size']}-slot pages)" if meta.get("page_size") else "contiguous"
    return {
        "title": f"One new token against {cache}, {layout} cache",
        "device": meta["device"], "jax_version": meta["jax"], "date": meta["date"],
        "command": meta["command"], "peers": sorted(names),
        "setup": [f"{meta['shape']} (Llama-3-8B's attention), every cache slot in use; B is the "
                  "batch, S the cache slots. us/call is one layer's call, timed chained over "
                  "enough distinct caches to stream 512 MiB between visits of the same one (no "
                  "L2 reuse); device us: its kernels alone, from a profiler trace. GB/s counts "
                  "q, the output and every cache token's codes and scales once. "
                  f"`{READ_FLOOR}`: an XLA sum reading the same bytes, timed the same way."],
        "columns": [{"key": "shape", "label": "batch, cache"},
                    {"key": "implementation", "label": "implementation"},
                    {"key": "us", "label": "us/call", "format": ".1f"},
                    {"key": "device_us", "label": "device us", "format": ".1f"},
                    {"key": "gbs", "label": "GB/s", "format": ",d"},
                    {"key": "of_copy", "label": "% of copy", "format": "d"},
                    {"key": "rel_err", "label": "rel. error", "format": ".1e"}],
        "rows": out,
        "notes": [f"Copy bandwidth in the same run: {copy:.0f} GB/s (a 512 MiB bf16 array read "
                  "and written: reads alone can exceed it)." if copy else
                  "Copy bandwidth not measured."],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here (after every shape)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64 at 4k only")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--lengths", help="comma-separated cache lengths (default 4096,16384,32768)")
    parser.add_argument("--format", default="bf16", choices=("bf16", "int8", "fp8"))
    parser.add_argument("--page-size", type=int, help="a paged cache of this page size")
    parser.add_argument("--impls", help="comma-separated subset of " + ",".join(IMPLEMENTATIONS))
    parser.add_argument("--block-kv", type=int, help="block_kv for the Pallas kernels")
    parser.add_argument("--num-splits", type=int, help="num_splits for the Pallas kernels")
    parser.add_argument("--device-time", action="store_true",
                        help="also each call's device time from a profiler trace")
    parser.add_argument("--table", metavar="RESULTS_JSON",
                        help="print a --json file as a benchmarks/results table, and exit")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(json.dumps(results_table(json.load(f)), indent=1))
        return
    names = tuple(args.impls.split(",")) if args.impls else IMPLEMENTATIONS
    tiling = {k: v for k, v in (("block_kv", args.block_kv), ("num_splits", args.num_splits))
              if v is not None}
    batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else CACHE_LENGTHS
    shapes = ([(1, 4096), (64, 4096)] if args.quick
              else [(b, n) for b in batches for n in lengths])
    copy_gbs = copy_bandwidth() / 1e9 if jax.default_backend() == "gpu" else None
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "format": args.format,
            "page_size": args.page_size, "tiling": tiling, "copy_gbs": copy_gbs,
            "command": _command(sys.argv[1:] if argv is None else argv),
            "shape": f"T=1 Hq={HEADS} Hkv={KV_HEADS} D={HEAD_DIM}"}
    print(meta, flush=True)
    rows = {}
    for batch, length in shapes:
        t0 = time.perf_counter()
        rows[f"B{batch} S{length}"] = bench_shape(
            batch, length, fmt=args.format, page_size=args.page_size, names=names,
            tiling=tiling, copy_gbs=copy_gbs, device_time=args.device_time)
        print(f"B{batch} S{length}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(format_table(rows, copy_gbs))


if __name__ == "__main__":
    main()
