"""jaxkit sweep end to end on a tiny config: each run a jaxkit train
subprocess in its own run directory, a partial run resumed from its
checkpoint, finished runs skipped, a failed run recorded while the others
go on, and the report of the finished runs."""
import json
import subprocess
import sys

import pytest
from tiny_sweep import train_env, write_sweep  # noqa: F401 - fixtures

from jaxkit.run.cli import main
from jaxkit.sweep.plan import load_sweep
from jaxkit.sweep.report import read_metrics


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_2x2_sweep_resumes_a_partial_run_skips_finished_ones_and_reports(
        write_sweep, train_env, tmp_path, capsys):
    path = write_sweep({"name": "tiny", "grid": {"optimizer.learning_rate": [0.001, 0.01]},
                        "seeds": [0, 1], "report": {"metrics": ["eval/ce", "train/loss"],
                                                    "x": "optimizer.learning_rate"}})
    sweep = load_sweep(path)
    first = sweep.runs[0]
    # a run that stopped at its step-2 checkpoint, as a killed sweep leaves one
    subprocess.run([sys.executable, "-m", "jaxkit.cli", "train", "base.yaml",
                    *[a for o in first.overrides for a in ("--set", o)], "--set", "train.steps=2",
                    "--run-dir", str(first.run_dir)], check=True, capture_output=True)
    main(["sweep", str(path), "--dry-run"])
    assert "(1 partial, 3 pending)" in capsys.readouterr().out

    main(["sweep", str(path)])
    out = capsys.readouterr().out
    assert "[1/4] learning_rate=0.001_seed0: resuming" in out
    assert "[4/4] learning_rate=0.01_seed1: done in" in out
    resumed = records(first.run_dir)
    assert [r["step"] for r in resumed if r["split"] == "compile"] == [0, 2]  # from step 2
    assert sorted(read_metrics(first.run_dir)["train"]) == [2, 4]
    for run in sweep.runs:
        record = json.loads((run.run_dir / "sweep_run.json").read_text())
        assert record["status"] == "done" and record["overrides"] == list(run.overrides)
        assert (run.run_dir / "train.log").read_text().startswith("$ ")
    # different seeds, different runs; the same learning rate and seed, the same run
    final = {run.name: read_metrics(run.run_dir)["eval"][4]["ce"] for run in sweep.runs}
    assert len(set(final.values())) == 4

    report = tmp_path / "runs/tiny/report"
    table = (report / "table.md").read_text().splitlines()
    assert table[0] == "| run | learning_rate | n | eval/ce | train/loss |"
    assert table[2].startswith("| learning_rate=0.001 | 0.001 | 2 | ") and " ± " in table[2]
    assert (report / "table.csv").read_text().splitlines()[0] == \
        "run,optimizer.learning_rate,seeds,eval/ce,eval/ce std,train/loss,train/loss std"
    for png in ("loss_curves.png", "eval_ce_vs_optimizer.learning_rate.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged = {run.name: (run.run_dir / "metrics.jsonl").read_text() for run in sweep.runs}
    main(["sweep", str(path)])
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert logged == {run.name: (run.run_dir / "metrics.jsonl").read_text() for run in sweep.runs}


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(write_sweep, train_env, tmp_path, capsys):
    path = write_sweep({"name": "mixed", "set": {"optimizer.learning_rate": 0.001},
                        "runs": [{"name": "broken", "data.kind": "tokens",
                                  "data.path": str(tmp_path / "no_data")},
                                 {"name": "fine"}]})
    with pytest.raises(SystemExit, match=r"sweep: 1 of 2 runs failed: broken_seed0 \(see"):
        main(["sweep", str(path)])
    out = capsys.readouterr().out
    assert "[1/2] broken_seed0: failed in" in out and "[2/2] fine_seed0: done in" in out
    runs = tmp_path / "runs/mixed"
    broken = json.loads((runs / "broken_seed0/sweep_run.json").read_text())
    assert broken["status"] == "failed" and broken["returncode"] != 0
    assert "no_data" in broken["error"]  # the run's own one-line error
    assert not (runs / "broken_seed0/metrics.jsonl").exists()
    table = (runs / "report/table.md").read_text()
    assert "fine" in table and "broken" not in table
    # run again: the failed run is tried again, the finished one skipped
    main(["sweep", str(path), "--dry-run"])
    assert "(1 done, 1 failed)" in capsys.readouterr().out


def test_runs_side_by_side_keep_an_init_from_chain_in_order(write_sweep, train_env, tmp_path,
                                                             capsys):
    """--devices 0,1: two runs at a time, each told its device; the run that
    starts from another's checkpoint starts after it is done; a run whose
    source fails is recorded failed without starting."""
    path = write_sweep({"name": "side", "seeds": [0], "runs": [
        {"name": "a"}, {"name": "b"},
        {"name": "a_longer", "train.steps": 6, "train.init_from": "runs/side/a_seed0"},
        {"name": "broken", "data.kind": "tokens", "data.path": str(tmp_path / "no_data")},
        {"name": "after_broken", "train.init_from": "runs/side/broken_seed0"}]})
    with pytest.raises(SystemExit, match=r"sweep: 2 of 5 runs failed: broken_seed0, after_broken"):
        main(["sweep", str(path), "--devices", "0,1"])
    out = capsys.readouterr().out
    assert "starting on device 0" in out and "starting on device 1" in out
    assert "after_broken_seed0: failed" not in out  # never started: no line of its own
    runs = tmp_path / "runs/side"
    record = lambda name: json.loads((runs / f"{name}_seed0/sweep_run.json").read_text())  # noqa
    a, longer = record("a"), record("a_longer")
    assert a["status"] == longer["status"] == record("b")["status"] == "done"
    assert {a["device"], longer["device"]} <= {"0", "1"}
    assert longer["started"] >= a["started"]
    # init_from needs a's checkpoint: started before a was done, it would have failed
    assert max(read_metrics(runs / "a_longer_seed0")["train"]) == 6
    assert not (runs / "after_broken_seed0").exists()
    with pytest.raises(SystemExit, match="distinct GPU ids"):
        main(["sweep", str(path), "--devices", "0,0"])


def test_a_run_another_process_holds_is_left_alone(write_sweep, train_env, tmp_path, capsys):
    """A sweep whose run directory another training process holds (another
    sweep sharing the run) records it failed, naming the holder, and leaves
    that run's files as they are."""
    from jaxkit.checkpoint.run_dir import exclusive
    path = write_sweep({"name": "busy", "seeds": [0], "runs": [{"name": "held"}]})
    run_dir = tmp_path / "runs/busy/held_seed0"
    with exclusive(run_dir):
        with pytest.raises(SystemExit, match="1 of 1 runs failed"):
            main(["sweep", str(path)])
    assert "is in use by another training process (pid" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
