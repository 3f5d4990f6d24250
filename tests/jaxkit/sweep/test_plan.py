"""Sweep files: expansion into named runs, the checks that come before any
run, and what --dry-run, --print-commands and --slurm print or write."""
import shlex
import sys

import pytest
import yaml
from tiny_sweep import write_sweep  # noqa: F401 - a fixture

from jaxkit.config import load_config
from jaxkit.run.cli import main
from jaxkit.sweep.plan import SweepError, format_value, load_sweep, resolve


def test_grid_entries_and_seeds_expand_in_order(write_sweep):
    path = write_sweep({
        "set": {"train.steps": 3},
        "grid": {"optimizer.learning_rate": [0.001, 0.01]},
        "runs": [{"model.moe.num_experts": 0, "seeds": [5]},
                 {"name": "wide", "model.d_model": 64}],
        "seeds": [0, 1]})
    sweep = load_sweep(path)
    assert sweep.name == path.parent.name  # a sweep.yaml is named after its folder
    assert [r.name for r in sweep.runs] == [
        "num_experts=0,learning_rate=0.001_seed5", "num_experts=0,learning_rate=0.01_seed5",
        "wide,learning_rate=0.001_seed0", "wide,learning_rate=0.001_seed1",
        "wide,learning_rate=0.01_seed0", "wide,learning_rate=0.01_seed1"]
    assert [r.index for r in sweep.runs] == list(range(6))
    wide = sweep.runs[3]
    assert wide.label == "wide,learning_rate=0.001" and wide.seed == 1
    assert wide.varied == {"run": "wide", "optimizer.learning_rate": 0.001}
    assert wide.overrides == ("train.steps=3", "model.d_model=64",
                              "optimizer.learning_rate=0.001", "train.seed=1")
    assert wide.run_dir == sweep.out / wide.name and str(sweep.out) == f"runs/{sweep.name}"
    configs = resolve(sweep)
    assert configs[3].model.d_model == 64 and configs[3].train.seed == 1
    assert configs[0].optimizer.learning_rate == 0.001 and configs[0].train.steps == 3


def test_names_shorten_keys_only_as_far_as_they_stay_apart(write_sweep):
    sweep = load_sweep(write_sweep({"grid": {"model.quant.block_size": [16], "data.seed": [3],
                                             "generate.seed": [4], "model.max_seq_len": [32]},
                                    "seed_keys": ["train.seed", "model.moe.num_experts"],
                                    "seeds": [0]}))
    (run,) = sweep.runs
    assert run.name == "block_size=16,data.seed=3,generate.seed=4,max_seq_len=32_seed0"
    assert run.overrides[-2:] == ("train.seed=0", "model.moe.num_experts=0")


@pytest.mark.parametrize("value", ["cosine", "true", "1e-3", "a: b", "", 3, 2.5e-4, True, None,
                                   ["q", "k"], {"batch": ["data", "fsdp"]}])
def test_values_reach_the_config_as_written(value):
    assert yaml.safe_load(format_value(value)) == value


def test_a_list_value_sets_a_tuple_key(write_sweep):
    sweep = load_sweep(write_sweep({"grid": {"model.quant.targets": [["q", "k"], ["mlp"]]}}))
    assert [r.name for r in sweep.runs] == ["targets=q+k_seed0", "targets=mlp_seed0"]
    assert resolve(sweep)[0].model.quant.targets == ("q", "k")


BAD = [
    ({"grid": {"optimizer.shedule": ["wsd"]}},
     "run 0 (shedule=wsd_seed0): unknown config key 'optimizer.shedule'; did you mean "
     "optimizer.schedule?"),
    ({"grid": {"optimizer.schedule": ["cosine", "wsdd"]}},
     "run 1 (schedule=wsdd_seed0): optimizer.schedule: 'wsdd' is not one of"),
    ({"set": {"optimizer.learning_rate": -1}}, "optimizer.learning_rate must be > 0, got -1.0"),
    ({"grid": {"optimizer.learning_rate": 0.1}},
     "grid.optimizer.learning_rate: expected a non-empty list of values, got 0.1"),
    ({"grid": {"train.steps": [2]}, "runs": [{"train.steps": 3}]},
     "runs[0].train.steps: also a grid key"),
    ({"runs": [{"name": "a/b"}]}, "runs[0].name: 'a/b' is not a directory name"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "runs 0 and 1 would share the run directory 'a_seed0'"),
    ({"seeds": [0, 0]}, "seeds: [0, 0] repeats a seed"),
    ({"seeds": 1}, "seeds: expected a non-empty list of integers >= 0, got 1"),
    ({"grids": {}}, "unknown key 'grids'"),
    ({"base": "nowhere.yaml"}, "base: 'nowhere.yaml' is neither beside the sweep file"),
    ({"report": {"metrics": ["eval"]}}, "report.metrics: 'eval' is not SPLIT/KEY"),
    ({"report": {"metrics": ["mode:eval/ce"]}}, "unknown statistic 'mode'"),
    ({"report": {"x": "optimizer.lr"}}, "report.x: 'optimizer.lr' is not a config key"),
    ({"seed_keys": ["train.sead"]}, "unknown config key 'train.sead'"),
    ({"runs": [{"model.quant.mode": "qat", "model.quant.weight_format": "int3"}]},
     "model.quant: "),
]


@pytest.mark.parametrize("spec, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_sweep_files_are_one_line_errors_before_any_run(write_sweep, capsys, spec, message):
    path = write_sweep(spec)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path)])
    text = str(exit_.value)
    assert text.startswith(f"config error: {path}: ") and message in text and "\n" not in text
    assert not (path.parent / "runs").exists()


def test_dry_run_lists_runs_overrides_and_states(write_sweep, capsys):
    path = write_sweep({"name": "plan", "set": {"train.steps": 3},
                        "grid": {"optimizer.schedule": ["cosine", "linear"]}, "seeds": [0, 1]})
    sweep = load_sweep(path)
    sweep.runs[2].run_dir.mkdir(parents=True)
    (sweep.runs[2].run_dir / "metrics.jsonl").write_text("")  # begun elsewhere
    main(["sweep", str(path), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep plan: 4 runs of base.yaml in runs/plan (1 partial, 3 pending)"
    assert lines[1] == "every run: train.steps=3"
    assert lines[2].split() == ["0", "pending", "schedule=cosine_seed0",
                                "optimizer.schedule=cosine", "train.seed=0"]
    assert lines[4].split()[:3] == ["2", "partial", "schedule=linear_seed0"]
    assert len(lines) == 6


def test_only_names_a_run_of_the_sweep(write_sweep):
    path = write_sweep({"seeds": [0, 1]})
    with pytest.raises(SystemExit, match=r"--only 2: .* has 2 runs \(0 to 1\)"):
        main(["sweep", str(path), "--only", "2"])


def test_print_commands_are_the_runs_train_commands(write_sweep, capsys):
    path = write_sweep({"name": "cmds", "grid": {"optimizer.warmup_steps": [0, 2]},
                        "report": {"metrics": ["eval/ce", "median:train/tokens_per_second"],
                                   "x": "optimizer.warmup_steps"}})
    main(["sweep", str(path), "--print-commands"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# 0: warmup_steps=0_seed0"
    args = shlex.split(lines[1])
    assert args == ["jaxkit", "train", "base.yaml", "--set", "optimizer.warmup_steps=0",
                    "--set", "train.seed=0", "--run-dir", "runs/cmds/warmup_steps=0_seed0",
                    "--resume"]
    cfg = load_config(args[2], [a for a in args[3:7] if a != "--set"])
    assert cfg.optimizer.warmup_steps == 0
    assert shlex.split(lines[-1]) == [
        "jaxkit", "report", "runs/cmds/warmup_steps=0_seed0", "runs/cmds/warmup_steps=2_seed0",
        "--out", "runs/cmds/report", "--metrics", "eval/ce",
        "median:train/tokens_per_second", "--x", "optimizer.warmup_steps"]


def test_slurm_script_has_one_array_task_per_run(write_sweep, tmp_path, capsys):
    path = write_sweep({"name": "array", "grid": {"optimizer.warmup_steps": [0, 1, 2]},
                        "slurm": ["--gres=gpu:1", "--time=00:30:00"]})
    main(["sweep", str(path), "--slurm", "job.sh"])
    script = (tmp_path / "job.sh").read_text()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=array", "#SBATCH --array=0-2",
                      f"#SBATCH --output={tmp_path}/runs/array/slurm-%A_%a.log",
                      "#SBATCH --gres=gpu:1", "#SBATCH --time=00:30:00"]
    commands = [line for line in lines if not line.startswith("#")]
    assert commands == [f"cd {tmp_path}", f'jaxkit sweep {path} --only "$SLURM_ARRAY_TASK_ID"']
    # sbatch reads #SBATCH lines only before the first command
    assert lines.index(sbatch[-1]) < lines.index(commands[0])
    assert (tmp_path / "runs/array").is_dir()  # the tasks' log folder


def test_without_matplotlib_a_sweep_stops_before_its_runs(write_sweep, tmp_path, monkeypatch):
    path = write_sweep({"name": "noplots"})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(SystemExit, match=r"^the report's plots need matplotlib: pip install "):
        main(["sweep", str(path)])
    assert not (tmp_path / "runs").exists()
