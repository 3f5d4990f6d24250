"""The block-sparse benchmark on CPU: its causal lists, and one tiny run end
to end (kernels interpreted) with its JSON and table."""
import json

import jax
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import bench


@pytest.mark.parametrize("keep", [1.0, 1 / 4, 1 / 16])
def test_causal_lists_keep_the_sink_window_and_their_share(keep):
    indices, counts = bench.causal_lists(jax.random.key(0), q_len=1000, list_heads=2,
                                         block_q=64, block_k=128, keep=keep)
    last = bench.last_causal_blocks(1000, 64, 128)
    want = np.maximum(1, np.round(keep * (last + 1)))
    idx, cnt = np.asarray(indices), np.asarray(counts)
    assert (cnt[0] == want).all()
    for h, i in np.ndindex(cnt.shape[1:]):
        row = idx[0, h, i, :cnt[0, h, i]]
        assert len(set(row)) == len(row) and row.max() <= last[i]  # distinct, causal
        assert last[i] in row and (0 in row or cnt[0, h, i] < 2)   # window, then the sink


def test_bench_runs_end_to_end(tmp_path, capsys):
    path = tmp_path / "bsa.json"
    bench.main(["--seq-lens", "200", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                "--block-q", "32", "--block-k", "32", "--dtype", "float32", "--keeps", "1",
                "--impls", "bsa-blockspec,dense-xla", "--iters", "1", "--rounds", "1",
                "--json", str(path)])
    results = json.loads(path.read_text())["results"]
    assert set(results) == {"200/1"}
    sparse = results["200/1"]["bsa-blockspec"]
    # Every causal block kept: dense attention.
    assert sparse["vs"] == "dense-xla" and sparse["rel_err"] < 1e-5
    assert sparse["fwd_ms"] > 0 and sparse["fwdbwd_ms"] > 0 and sparse["fwdbwd_tflops"] > 0
    assert results["200/1"]["lists"]["kept"] == 1.0
    assert "bsa-blockspec" in capsys.readouterr().out
