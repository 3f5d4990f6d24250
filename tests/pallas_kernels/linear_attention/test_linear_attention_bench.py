"""The linear-vs-softmax benchmark runs end to end on CPU at a tiny size
(both kernels as 'xla'), writes its JSON and reports refused
implementations in the table instead of stopping."""
import json

from pallas_kernels.linear_attention import bench


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    results = bench.main(["--lengths", "96", "--heads", "2", "--dim", "32", "--linear", "xla",
                          "--flash", "xla", "--iters", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["meta"]["linear"] == "xla" and list(saved["results"]) == ["96"]
    for kernel in ("linear", "flash"):
        r = results[96][kernel]
        assert r["fwd_tokens_per_s"] > 0 and r["fwdbwd_tokens_per_s"] > 0, r


def test_refused_implementations_are_reported_in_the_table():
    results = bench.bench_length(32, B=1, H=1, D=16, linear="cudnn", flash="ragged_dot", chunk=16,
                                 iters=1)
    assert "unknown linear attention implementation 'cudnn'" in results["linear"]["fwd_error"]
    assert "unknown attention implementation 'ragged_dot'" in results["flash"]["fwdbwd_error"]
    table = bench.format_table({32: results})
    assert "unknown linear attention" in table and "'ragged_dot'" in table
