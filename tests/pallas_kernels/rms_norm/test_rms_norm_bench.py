"""The norm benchmark runs end to end on CPU at a tiny size (the kernel
interpreted), writes its JSON and reports a refused implementation in the
table instead of stopping."""
import json

from pallas_kernels.rms_norm import bench


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    results = bench.main(["--shapes", "24x96", "--iters", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["meta"]["implementations"] == ["xla", "pallas"]
    assert list(saved["results"]) == ["24x96"]
    r = results["24x96"]
    assert r["copy_gb_per_s"] > 0
    for op in ("rms_norm", "add_rms_norm"):
        for impl in ("xla", "pallas"):
            entry = r[op][impl]
            assert entry["fwd_gb_per_s"] > 0 and entry["fwdbwd_gb_per_s"] > 0, entry
            assert entry["rel_err"] < 1e-2, entry


def test_refused_implementations_are_reported_in_the_table():
    results = bench.bench_shape(8, 32, ["cudnn"], iters=1)
    assert "unknown rms norm implementation 'cudnn'" in results["rms_norm"]["cudnn"]["fwd_error"]
    assert "'cudnn'" in bench.format_table({"8x32": results})
