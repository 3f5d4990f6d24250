"""The decode benchmark's bookkeeping at a tiny shape: bytes, chained
timings, GB/s against the copy, errors in the table instead of a stop."""
import functools
import json

import pytest

from pallas_kernels import benchmarking
from pallas_kernels.decode_attention import bench
from pallas_kernels.quant_matmul import bench as quant_bench


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 4)
    monkeypatch.setattr(bench, "KV_HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 64)
    monkeypatch.setattr(bench, "STREAM_BYTES", 2**16)
    monkeypatch.setattr(bench, "CHAIN_BYTES", 1)
    # Few samples: the bookkeeping is under test, not the clock.
    monkeypatch.setattr(quant_bench, "time_fn",
                        functools.partial(benchmarking.time_fn, warmup=1, iters=2, calls=1))


def test_cudnn_takes_contiguous_bf16_caches_only():
    names = ("xla", "cudnn", "blockspec")
    assert set(bench.implementations(names, None, "bf16", {})) == set(names)
    assert set(bench.implementations(names, None, "int8", {})) == {"xla", "blockspec"}
    assert set(bench.implementations(names, object(), "bf16", {})) == {"xla", "blockspec"}


def test_bench_shape_times_and_reports(tiny):
    row = bench.bench_shape(1, 64, fmt="int8", page_size=16, names=("xla", "cudnn", "blockspec"),
                            copy_gbs=100.0)
    # q and the output in bf16, and 64 tokens of int8 k and v with float32 scales.
    assert row["bytes"] == 2 * 4 * 64 * 2 + 64 * 2 * 2 * (64 + 4)
    assert row["layers"] == -(-2**16 // row["bytes"]) > 1
    results = row["results"]
    assert set(results) == {"xla", "blockspec"}
    for name in ("xla", "blockspec"):
        r = results[name]
        assert r["seconds"] > 0 and r["gbs"] == pytest.approx(row["bytes"] / r["seconds"] / 1e9)
        assert r["of_copy"] == pytest.approx(r["gbs"] / 100.0)
    assert results["blockspec"]["rel_err_vs_xla"] < 1e-2
    assert row["read_seconds"] > 0
    table = bench.format_table({"tiny": row, "failed": {"results": {"cudnn": {"error": "E: x"}}}},
                               100.0)
    assert "copy bandwidth 100 GB/s" in table and "blockspec" in table and "E: x" in table
    assert "an XLA sum reading the same bytes" in table


def test_table_lists_each_calls_kernels():
    row = {"results": {"mosaic_gpu": {"seconds": 15e-6, "device_gbs": 1100.0,
                                      "kernels": {"decode_kernel": (6, 9.1e-6),
                                                  "merge_fusion": (6, 2.1e-6)}}}}
    lines = bench.format_table({"B1 S4096": row}, None).splitlines()
    assert "decode_kernel" in lines[-2] and "9.10 us" in lines[-2]
    assert "merge_fusion" in lines[-1] and "6 x" in lines[-1]


def test_a_run_becomes_a_benchmarks_table(tiny, tmp_path, capsys):
    """--json then --table: a table render.py accepts, with the run's command
    (without its --json path), a row per implementation and the read floor."""
    from benchmarks import render

    out = tmp_path / "decode.json"
    bench.main(["--batches", "1", "--lengths", "64", "--impls", "xla,blockspec",
                "--json", str(out)])
    capsys.readouterr()
    bench.main(["--table", str(out)])
    table = json.loads(capsys.readouterr().out)
    data = {"op": "decode_attention", "title": "t", "about": [], "tables": [table]}
    render.validate(data, "decode_attention.json")
    assert table["command"] == ("python -m pallas_kernels.decode_attention.bench --batches 1 "
                                "--lengths 64 --impls xla,blockspec")
    assert [r["implementation"] for r in table["rows"]] == ["xla", "blockspec", bench.READ_FLOOR]
    assert table["peers"] == ["blockspec", "xla"]
    assert any(line.startswith("| B1 S64 | xla |") for line in render.render_table(table))
