"""The decode benchmark's bookkeeping at a tiny shape: bytes, chained
timings, GB/s against the copy, errors in the table instead of a stop."""
import pytest

from pallas_kernels.decode_attention import bench


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 4)
    monkeypatch.setattr(bench, "KV_HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 64)
    monkeypatch.setattr(bench, "STREAM_BYTES", 2**16)
    monkeypatch.setattr(bench, "MIN_CALLS", 1)


@pytest.mark.parametrize("fmt,page_size", [("bf16", None), ("int8", 16)])
def test_bench_shape_times_and_reports(tiny, fmt, page_size):
    row = bench.bench_shape(1, 64, fmt=fmt, page_size=page_size,
                            names=("xla", "cudnn", "blockspec"), copy_gbs=100.0)
    # q and the output in bf16, and 64 tokens of k and v.
    per_token = 2 * 2 * (64 * 2 if fmt == "bf16" else 64 + 4)
    assert row["bytes"] == 2 * 4 * 64 * 2 + 64 * per_token
    assert row["layers"] == -(-2**16 // row["bytes"]) > 1
    results = row["results"]
    assert set(results) == ({"xla", "cudnn", "blockspec"} if fmt == "bf16" and not page_size
                            else {"xla", "blockspec"})
    for name in ("xla", "blockspec"):
        r = results[name]
        assert r["seconds"] > 0 and r["gbs"] == pytest.approx(row["bytes"] / r["seconds"] / 1e9)
        assert r["of_copy"] == pytest.approx(r["gbs"] / 100.0)
    assert results["blockspec"]["rel_err_vs_xla"] < 1e-2
    table = bench.format_table({"tiny": row}, 100.0)
    assert "copy bandwidth 100 GB/s" in table and "blockspec" in table
    if "cudnn" in results and "error" in results["cudnn"]:
        assert results["cudnn"]["error"][:40] in table
