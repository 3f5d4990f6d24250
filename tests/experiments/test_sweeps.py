"""The experiments' sweep files plan and pass every config check, and their
analyses read the runs' metrics as the trainer writes them."""
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from experiments.attention_training import analysis as attention_analysis
from experiments.moe_balance import analysis as moe_analysis
from experiments.quant_formats import analysis as quant_analysis
from jaxkit.config import ModelConfig
from jaxkit.models import Transformer
from jaxkit.run.build import check_config
from jaxkit.sweep.plan import load_sweep, resolve

ROOT = Path(__file__).parents[2]
SHARED_BASELINE = ("int_vs_fp_formats", "fp4_training", "nm_sparsity", "lr_schedules")
SHARED_OUT = Path("runs/gpt_125m_2000_steps")
REPRODUCTIONS = SHARED_BASELINE + ("moe_load_balancing",)
SWEEPS = {"moe_balance": 3, "quant_formats": 14, "attention_training": 3, "lr_schedules": 5,
          "moe_load_balancing": 6, "nm_sparsity": 4, "fp4_training": 6, "int_vs_fp_formats": 6}


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_files_resolve(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(f"experiments/{name}/sweep.yaml")
    configs = resolve(sweep, check_config)
    assert sweep.name == name and len(configs) == SWEEPS[name]
    assert sweep.out == (SHARED_OUT if name in SHARED_BASELINE else Path("runs") / name)
    if name in REPRODUCTIONS:  # their tables and plots belong in the repository
        assert sweep.report_dir == Path("experiments") / name / "results"


def test_gpt_125m_sweeps_share_their_baseline_runs(monkeypatch):
    """The four 2000-step gpt_125m sweeps resolve their baseline to the same
    configs in the same directories, so it trains once; their other runs'
    directories are all distinct."""
    monkeypatch.chdir(ROOT)
    baselines, others = {}, []
    for name in SHARED_BASELINE:
        sweep = load_sweep(f"experiments/{name}/sweep.yaml")
        for run, cfg in zip(sweep.runs, resolve(sweep)):
            if run.label == "baseline":
                baselines.setdefault(run.run_dir, []).append(cfg)
            else:
                others.append(run.run_dir)
    assert sorted(baselines) == [SHARED_OUT / "baseline_seed0", SHARED_OUT / "baseline_seed1"]
    for configs in baselines.values():
        assert len(configs) == 4 and all(c == configs[0] for c in configs)
    assert len(set(others)) == len(others)


def test_lr_schedules_compare_at_equal_steps_with_two_baseline_seeds():
    sweep = load_sweep(ROOT / "experiments/lr_schedules/sweep.yaml")
    configs = resolve(sweep)
    assert [r.name for r in sweep.runs] == ["baseline_seed0", "baseline_seed1", "cosine_zero_seed0",
                                            "wsd_seed0", "linear_zero_seed0"]
    assert {c.train.steps for c in configs} == {2000}
    assert configs[1].train.seed == configs[1].data.seed == 1
    schedules = [(c.optimizer.schedule, c.optimizer.min_lr_ratio) for c in configs]
    assert schedules[4] == ("linear", 0.0) and schedules[0] == ("cosine", 0.1)


def test_moe_load_balancing_arms():
    configs = resolve(load_sweep(ROOT / "experiments/moe_load_balancing/sweep.yaml"))
    arms = [(c.model.moe.router, c.model.moe.aux_loss_weight, c.model.moe.bias_update_rate)
            for c in configs]
    assert arms[0][:2] == arms[1][:2] == ("topk_softmax", 0.01)  # the baseline, two seeds
    assert [(c.train.seed, c.data.seed) for c in configs[:3]] == [(0, 0), (1, 1), (0, 0)]
    assert arms[2:5] == [("sigmoid_bias", 0.0, 0.001), ("sigmoid_bias", 0.0, 0.01),
                         ("sigmoid_bias", 0.0, 0.0)]
    assert arms[5][:2] == ("topk_softmax", 0.01)
    assert [c.model.moe.center_router_input for c in configs] == [False] * 5 + [True]
    assert {c.model.num_layers for c in configs} == {16}  # configs/moe_1b.yaml
    assert {c.data.batch_size for c in configs} == {32}


def write_metrics(run_dir: Path, train: dict, evals: dict, seconds: float = 1.0) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"step": s, "split": "train", **r} for s, r in train.items()]
    lines += [{"step": s, "split": "eval", "ce": ce} for s, ce in evals.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "sweep_run.json").write_text(json.dumps({"status": "done", "seconds": seconds}))


def test_moe_balance_analysis_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, run in enumerate(load_sweep(ROOT / "experiments/moe_balance/sweep.yaml").runs):
        write_metrics(run.run_dir, {s: {"loss": 2.0, "moe/1/max_mean_load": 3.0 - i * s / 100,
                                        "moe/3/max_mean_load": 2.0} for s in range(5, 105, 5)},
                      {100: 1.8 + i / 100}, seconds=10.0 * (i + 1))
    moe_analysis.main(["--out", str(tmp_path / "out")])
    text = (tmp_path / "out/results.md").read_text()
    assert "| sigmoid_no_update | 2.42 | 2.05 |" in text  # layers 1 and 3, first and last 5 steps
    assert "| softmax_aux | 1.00 | 2.00 | 1.820 |" in text  # per layer at step 100
    assert "sigmoid_bias 10, sigmoid_no_update 20, softmax_aux 30" in text
    assert json.loads((tmp_path / "out/results.json").read_text())["softmax_aux"]["seconds"] == 30


def test_attention_analysis_table(tmp_path, capsys):
    for impl, tok_s in (("xla", 100.0), ("pallas", 200.0)):
        write_metrics(tmp_path / impl, {s: {"loss": 3.0 - s / 100, "tokens_per_second": tok_s * s,
                                            "mfu": 0.1} for s in (25, 50, 75)}, {75: 2.5})
    attention_analysis.main([str(tmp_path / "xla"), str(tmp_path / "pallas")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | loss@25 | loss@50 | loss@75 | final eval loss | tokens/s | MFU |"
    assert lines[3] == "| pallas | 2.750 | 2.500 | 2.250 | 2.500 | 12,500 | 10.0% |"  # median of 50, 75


def test_quant_snr_ranks_formats_by_bits():
    model = Transformer(ModelConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=2,
                                    mlp_hidden=64, max_seq_len=32, compute_dtype="float32"),
                        rngs=nnx.Rngs(0))

    class Val:
        def eval_batches(self, n):
            rng = np.random.default_rng(0)
            return [{"inputs": rng.integers(0, 64, (2, 32))} for _ in range(n)]

    weights, acts = quant_analysis.capture(model, Val())
    assert len(weights) == len(acts) == 7 and acts[0].shape == (2 * 2 * 32, 64)
    snr = quant_analysis.snr_table(weights, acts, ["int8", "int4"])
    for key in ("weights", "activations", "weights_hadamard", "activations_hadamard"):
        assert snr["int8"][key] > snr["int4"][key] + 15  # about 6 dB a bit
