"""The row-gather benchmark runs end to end on CPU at a tiny size (the kernel
interpreted), writes its JSON and reports a refused implementation in the
table instead of stopping."""
import json

from pallas_kernels.row_gather import bench


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    results = bench.main(["--shapes", "24x3x32", "--iters", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["meta"]["implementations"] == ["xla", "pallas"]
    r = results["24x3x32"]
    assert r["copy_gb_per_s"] > 0
    for op in ("gather", "sum", "combine"):
        for impl in ("xla", "pallas"):
            assert r[op][impl]["gb_per_s"] > 0 and r[op][impl]["rel_err"] < 1e-2, r[op][impl]


def test_refused_implementations_are_reported_in_the_table():
    results = bench.bench_shape(8, 2, 48, ["pallas"], iters=1)
    assert "cannot run this row gather" in results["gather"]["pallas"]["error"]
    assert "cannot run this row gather" in bench.format_table({"8x2x48": results})
