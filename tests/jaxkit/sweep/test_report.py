"""jaxkit report on run directories written here: the last record of a
step counts, metric statistics and patterns, mean ± std over seeds, the CSV,
the plots, and the one-line errors."""
import csv
import json
import statistics
import sys

import pytest
import yaml

from jaxkit.run.cli import main
from jaxkit.sweep.report import MetricSpec, find_runs, load_run, read_metrics


def write_run(run_dir, train, evals, *, lr=0.001, schedule="cosine", seed=0, label=None):
    """A run directory: train records {step: {key: value}}, eval records
    {step: ce}, config.yaml, and (with label) a sweep's record."""
    run_dir.mkdir(parents=True)
    lines = [{"step": 0, "split": "compile", "compile_seconds": 1.0}]
    lines += [{"step": s, "split": "train", **r} for s, r in train.items()]
    lines += [{"step": s, "split": "eval", "ce": ce} for s, ce in evals.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"optimizer": {"learning_rate": lr, "schedule": schedule}, "train": {"seed": seed}}))
    if label is not None:
        (run_dir / "sweep_run.json").write_text(json.dumps(
            {"label": label, "seed": seed, "status": "done",
             "varied": {"optimizer.learning_rate": lr, "optimizer.schedule": schedule}}))
    return run_dir


def test_the_last_record_of_a_step_counts(tmp_path):
    run = write_run(tmp_path / "r", {2: {"loss": 5.0}, 4: {"loss": 4.0}}, {4: 3.0})
    with open(run / "metrics.jsonl", "a") as f:  # resumed from step 2: steps 4 logged again
        f.write(json.dumps({"step": 4, "split": "train", "loss": 3.5}) + "\n")
        f.write('{"step": 6, "split": "tr')  # the line a killed run was writing
    assert read_metrics(run)["train"] == {2: {"step": 2, "split": "train", "loss": 5.0},
                                          4: {"step": 4, "split": "train", "loss": 3.5}}


def test_statistics_over_steps_and_means_over_matching_keys(tmp_path):
    train = {s: {"loss": 10.0 - s, "moe/layer_1/max_mean_load": 1.0 + s,
                 "moe/layer_3/max_mean_load": 3.0 + s, "moe/layer_1/load": [0.5, 0.5]}
             for s in range(1, 21)}
    records = read_metrics(write_run(tmp_path / "r", train, {20: 2.5}))
    value = lambda text: MetricSpec.parse(text).value(records)
    assert value("train/loss") == value("last:train/loss") == 10.0 - 20
    assert value("min:train/loss") == -10.0 and value("max:train/loss") == 9.0
    assert value("mean:train/loss") == pytest.approx(-0.5)
    assert value("median:train/loss") == pytest.approx(-0.5)
    assert value("tail:train/loss") == pytest.approx(statistics.fmean([-9.0, -10.0]))  # last 2 of 20
    assert value("train/moe/*/max_mean_load") == pytest.approx(22.0)  # mean of 21 and 23
    assert value("eval/ce") == 2.5
    assert value("eval/accuracy") is None
    assert str(MetricSpec.parse("last:eval/ce")) == "eval/ce"


def test_report_table_csv_and_plots_over_seeds(tmp_path, capsys):
    runs = tmp_path / "sweep"
    losses = {("cosine", 0.001): [3.0, 3.2], ("cosine", 0.01): [2.0, 2.4],
              ("linear", 0.001): [2.9, 3.1], ("linear", 0.01): [1.9]}
    for (schedule, lr), finals in losses.items():
        for seed, final in enumerate(finals):
            label = f"lr={lr},schedule={schedule}"
            write_run(runs / f"{label}_seed{seed}", {10: {"loss": final + 1}, 20: {"loss": final}},
                      {20: final}, lr=lr, schedule=schedule, seed=seed, label=label)
    main(["report", str(runs), "--metrics", "eval/ce", "train/loss", "--x",
          "optimizer.learning_rate"])
    report = runs / "report"
    table = (report / "table.md").read_text().splitlines()
    assert capsys.readouterr().out.startswith("\n".join(table))
    assert table[0] == "| run | learning_rate | schedule | n | eval/ce | train/loss |"
    row = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert row["lr=0.01,schedule=cosine"] == \
        "| lr=0.01,schedule=cosine | 0.01 | cosine | 2 | 2.2000 ± 0.2828 | 2.2000 ± 0.2828 |"
    assert row["lr=0.01,schedule=linear"].endswith("| 1 | 1.9000 | 1.9000 |")  # one seed: no std
    with open(report / "table.csv") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    assert first["run"] == "lr=0.001,schedule=cosine" and first["seeds"] == "0 1"
    assert float(first["eval/ce"]) == pytest.approx(3.1)
    assert float(first["eval/ce std"]) == pytest.approx(statistics.stdev([3.0, 3.2]))
    assert rows[3]["eval/ce std"] == ""
    for png in ("loss_curves.png", "eval_ce_vs_optimizer.learning_rate.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a report folder beside the runs is not taken for a run
    assert len(find_runs([runs])) == 7


def test_runs_without_a_sweep_record_are_their_directory(tmp_path):
    run = load_run(write_run(tmp_path / "quickstart", {4: {"loss": 2.0}}, {4: 1.5}, seed=3))
    assert (run.label, run.seed, run.varied) == ("quickstart", 3, {})
    assert run.config["optimizer.learning_rate"] == 0.001


@pytest.mark.parametrize("args, message", [
    (["nothing_here"], "report: nothing_here is neither a run directory nor a folder of runs"),
    (["run", "--metrics", "evl/ce"], "report: 'evl/ce' is not SPLIT/KEY"),
    (["run", "--metrics", "eval:ce"], "report: 'eval:ce': unknown statistic 'eval'"),
])
def test_report_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", {4: {"loss": 2.0}}, {4: 1.5})
    with pytest.raises(SystemExit) as exit_:
        main(["report", *args])
    assert str(exit_.value).startswith(message)


def test_without_matplotlib_the_plots_are_a_one_line_error(tmp_path, monkeypatch):
    write_run(tmp_path / "run", {4: {"loss": 2.0}}, {4: 1.5})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert str(exit_.value) == \
        "the report's plots need matplotlib: pip install 'jaxkit[experiments]'"
    assert not (tmp_path / "out").exists()


def test_named_runs_are_labelled_once():
    """A list entry's name is the row label; it is not repeated as a swept key."""
    from jaxkit.sweep.report import Row, markdown_table
    spec = MetricSpec.parse("eval/ce")
    rows = [Row("cosine", {"run": "cosine"}, (), {str(spec): [2.0]}),
            Row("wsd", {"run": "wsd", "optimizer.schedule": "wsd"}, (), {str(spec): [1.5]})]
    header = [c.strip() for c in markdown_table(rows, [spec]).splitlines()[0].strip("|").split("|")]
    assert header == ["run", "schedule", "n", "eval/ce"], header  # keys shortened
