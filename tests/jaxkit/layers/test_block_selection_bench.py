"""The selection bench runs end to end on a CPU at a tiny shape and reports
what it kept: window 1 block + 1 sink block, or top-k 2, of the 1..8 causal
blocks of 8 query blocks: 15 / 36 of them; top-k 4: 26 / 36."""
import json

import pytest

from jaxkit.layers.sparse_attention import bench

TINY = ["--seq-lens", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
        "--block-size", "32", "--window", "32", "--sinks", "32", "--top-k", "2,4",
        "--dtype", "float32", "--impl", "xla", "--iters", "1"]


def test_bench_times_every_policy_and_budget(tmp_path):
    out = tmp_path / "bench.json"
    results = dict(bench.main(TINY + ["--json", str(out)]))
    labels = [label for _, label in results]
    assert labels == ["window_sinks", "infllm_v2/k2", "infllm_v2/k4", "proxy/k2", "proxy/k4"]
    kept = {label: r["kept"] for (_, label), r in results.items()}
    assert kept["window_sinks"] == kept["infllm_v2/k2"] == kept["proxy/k2"] == pytest.approx(15 / 36)
    assert kept["infllm_v2/k4"] == kept["proxy/k4"] == pytest.approx(26 / 36)
    for r in results.values():
        assert all(r[key] > 0 for key in ("select_ms", "sparse_fwd_ms", "sparse_fwdbwd_ms",
                                          "dense_fwd_ms", "dense_fwdbwd_ms"))
    assert len(json.loads(out.read_text())["results"]) == 5
