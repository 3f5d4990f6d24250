"""The attention benchmark's bookkeeping on CPU: rounds, ratios, the table."""

from pallas_kernels.attention import bench


def test_speedup_is_the_median_of_same_round_ratios():
    mine = {"fwd_round_ms": [1.0, 4.0, 4.0]}
    base = {"fwd_round_ms": [3.0, 4.0, 2.0]}
    # Per round 3.0, 1.0, 0.5: median 1.0 (the ratio of the medians, 3 / 4, would mix rounds).
    assert bench.speedup(mine, base, "fwd") == 1.0
    assert bench.speedup(mine, base, "fwdbwd") is None
    assert bench.speedup({}, base, "fwd") is None


def test_bench_shape_times_in_rounds_and_reports_failures():
    results = bench.bench_shape("tiny", 1, 72, 2, 1, 64, True, impls_filter=("xla", "cudnn"),
                                iters=3, rounds=3)
    xla = results["xla"]
    assert len(xla["fwd_round_ms"]) == 3 and len(xla["fwdbwd_round_ms"]) == 3
    assert xla["fwd_ms"] == sorted(xla["fwd_round_ms"])[1]
    assert xla["fwd_tflops"] > 0 and xla["fwdbwd_tflops"] > 0
    table = bench.format_table({"tiny": results})
    assert "tiny" in table and "xla" in table
    if "error" in results["cudnn"]:  # no cuDNN on CPU: the failure is in the table
        assert results["cudnn"]["error"] in table
