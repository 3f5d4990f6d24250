"""The long-context retrieval experiment: its sweep files pass every config
check, the GPU sweep pretrains dense through a curriculum of pair counts
(each stage from the last) and its fine-tunes start from an earlier run of
the same arm (each length from half of it, 16k from the last pretraining
stage) that the sweep runs first, and the analysis writes the table of accuracy against kept
blocks and speed-up."""
import json
from pathlib import Path

import pytest

from experiments.long_context_retrieval import analysis
from jaxkit.config import save_config
from jaxkit.run.build import check_config
from jaxkit.sweep.plan import load_sweep, resolve

ROOT = Path(__file__).parents[2]
HERE = ROOT / "experiments/long_context_retrieval"
LENGTHS = [16384, 32768, 65536, 131072]


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(HERE / "sweep_gpu.yaml")
    return sweep, resolve(sweep, check_config)


def test_gpu_sweep_pretrains_then_chains_each_arm_over_the_lengths(gpu):
    sweep, configs = gpu
    runs = dict(zip((r.label for r in sweep.runs), configs))
    dirs = {r.label: r.run_dir for r in sweep.runs}
    order = list(dirs)
    stages = ["pairs8", "pairs16", "pairs32", "pairs128"]
    assert order[:4] == stages and runs["pairs8"].train.init_from is None
    for previous, stage in zip(stages, stages[1:]):
        assert Path(runs[stage].train.init_from) == dirs[previous]
    assert [runs[s].data.mqar_num_kv_pairs for s in stages] == [8, 16, 32, 128]
    assert [runs[s].data.seq_len for s in stages] == [128, 256, 512, 2048]
    assert all(runs[s].model.attention.sparse.policy == "none" for s in stages)
    sources = {}
    for arm in ("dense", "local", "infllm_k32", "proxy_k32"):
        source = "pairs128"
        for length in LENGTHS:
            sources[f"{arm}_{length // 1024}k"] = source
            source = f"{arm}_{length // 1024}k"
    assert sources.keys() == runs.keys() - set(stages)
    for label, source in sources.items():
        cfg = runs[label]
        assert Path(cfg.train.init_from) == dirs[source], label
        assert order.index(source) < order.index(label)  # the source runs first
        assert cfg.data.mqar_num_kv_pairs == 128
        first = source == "pairs128"
        assert cfg.data.seq_len == (LENGTHS[0] if first else 2 * runs[source].data.seq_len)
        assert cfg.train.steps == (300 if first else 100)
    policies = {label: cfg.model.attention.sparse for label, cfg in runs.items()}
    assert {p.policy for label, p in policies.items() if label.startswith(("dense", "pairs"))} \
        == {"none"}
    assert {(p.policy, p.top_k_blocks) for label, p in policies.items()
            if label.startswith("infllm")} == {("infllm_v2", 32)}
    assert {(p.policy, p.top_k_blocks) for label, p in policies.items()
            if label.startswith("proxy")} == {("proxy", 32)}
    assert {(p.policy, p.window) for label, p in policies.items()
            if label.startswith("local")} == {("window_sinks", 2048)}
    assert all(cfg.checkpoint.enabled for cfg in configs)  # every run may be a source


def test_cpu_sweep_resolves(monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(HERE / "sweep.yaml")
    assert [r.label for r in sweep.runs] == ["dense", "local", "infllm_k2", "infllm_k4",
                                             "proxy_k2"]
    assert {c.data.seq_len for c in resolve(sweep, check_config)} == {1024}


def test_analysis_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(HERE / "sweep.yaml")
    configs = resolve(sweep)
    monkeypatch.chdir(tmp_path)  # the run directories (runs/...) go here
    for i, (run, cfg) in enumerate(zip(sweep.runs, configs)):
        run.run_dir.mkdir(parents=True)
        save_config(cfg, run.run_dir / "config.yaml")
        lines = [{"step": s, "split": "train", "ce": 4.0, "tokens_per_second": 1000.0 * (i + 1)
                  + s} for s in (25, 50, 75)]
        lines.append({"step": 75, "split": "eval", "ce": 3.5, "accuracy": 0.25 * i})
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    analysis.main(["--sweep", str(HERE / "sweep.yaml"), "--out", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[2] == \
        "| 1,024 | dense | dense | 100.0% | 1.00x | 0.000 | 3.500 |"
    analysis.main(["--sweep", str(HERE / "sweep.yaml"), "--out", str(tmp_path), "--measured"])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| tokens | run | policy | kept causal blocks | attention FLOP speed-up "
                        "bound | step speed-up (measured) | eval accuracy | eval CE |")
    assert table[2] == "| 1,024 | dense | dense | 100.0% | 1.00x | 1.00x | 0.000 | 3.500 |"
    # local: 2050 tokens/s (the median) over the dense run's 1050
    assert table[3].startswith("| 1,024 | local | window_sinks, block 64, window 128, sinks 0 | "
                               "22.8% | 4.39x | 1.95x | 0.250 |")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["proxy_k2"]["tokens_per_second"] == 5050.0
    assert (tmp_path / "accuracy_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.table.md").read_text().splitlines() == table
