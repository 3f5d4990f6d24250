"""Run directories: a fresh start never mixes with an earlier run (refused,
or --restart), a resume refuses a config that changes the checkpoint's
structure naming the keys, and neither that nor the commands that read a
run touch its files; all refusals come before anything is built."""
import json
import shutil

import pytest

from jaxkit.checkpoint.run_dir import structural_differences
from jaxkit.config import load_config, save_config, to_dict
from jaxkit.run import trainer
from jaxkit.run.cli import main
from multidevice import TINY

RUN = TINY + ["train.steps=4", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run trained to step 4 through the command line, and its config file."""
    base = tmp_path_factory.mktemp("run_dir")
    config = base / "tiny.yaml"
    save_config(load_config(None, RUN), config)
    main(["train", str(config), "--run-dir", str(base / "run")])
    return config, base / "run"


@pytest.fixture
def run(finished, tmp_path):
    config, run = finished
    shutil.copytree(run, tmp_path / "run")
    return ["--run-dir", str(tmp_path / "run")], config, tmp_path / "run"


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if a Trainer is constructed (a refusal must come first)."""
    def built(*args, **kwargs):
        raise AssertionError("the run was built before the refusal")
    monkeypatch.setattr(trainer, "Trainer", built)


def _refusal(argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_fresh_start_into_a_run_is_refused(run, nothing_built):
    where, config, run_dir = run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    message = _refusal(["train", str(config), *where])
    assert "checkpoints up to step 4" in message and "--resume" in message and "--restart" in message
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_restart_replaces_the_earlier_run(run, capsys):
    where, config, run_dir = run
    main(["train", str(config), *where, "--restart", "--set", "train.steps=2"])
    capsys.readouterr()
    main(["eval", str(config), *where])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]


def test_restart_deletes_only_from_a_jaxkit_run_directory(tmp_path, finished, nothing_built):
    config, _ = finished
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "model.pt").write_text("not ours")
    message = _refusal(["train", str(config), "--run-dir", str(other), "--restart"])
    assert "not a jaxkit run directory" in message
    assert (other / "checkpoints" / "model.pt").exists()


def test_resume_with_a_changed_structure_names_the_keys(run, nothing_built):
    where, config, run_dir = run
    before = (run_dir / "config.yaml").read_text()
    message = _refusal(["train", str(config), *where, "--resume", "--set", "model.d_model=64",
                        "--set", "optimizer.name=lion", "--set", "train.steps=8"])
    assert message.startswith("config error: --resume:")
    assert "model.d_model (32, now 64)" in message and "optimizer.name (adamw, now lion)" in message
    assert "train.steps" not in message
    assert (run_dir / "config.yaml").read_text() == before


def test_which_keys_a_resume_may_change():
    saved = to_dict(load_config(None, RUN))
    allowed = ["train.steps=9", "train.log_every=3", "train.eval_every=5", "train.progress=true",
               "data.path=elsewhere", "data.batch_size=8", "mesh.data=2", "checkpoint.every=5",
               "optimizer.learning_rate=0.1", "optimizer.schedule=wsd",
               "optimizer.warmup_steps=7", "optimizer.clip_norm=0.5", "model.remat=full"]
    assert structural_differences(saved, load_config(None, RUN + allowed)) == []
    for changed in ["model.num_layers=3", "model.scan_layers=true", "model.param_dtype=bfloat16",
                    "optimizer.name=adafactor", "optimizer.clip_norm=null",
                    "model.quant.mode=qat"]:
        key = changed.split("=")[0]
        differences = structural_differences(saved, load_config(None, RUN + [changed]))
        assert [d.split(" ")[0] for d in differences] == [key], changed


def test_reading_a_run_changes_nothing(run, capsys):
    where, config, run_dir = run
    # a save in progress (orbax's temporary directory) must survive an eval
    in_flight = run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1"
    in_flight.mkdir()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    main(["eval", str(config), *where, "--set", "train.steps=10"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 4
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert in_flight.is_dir()


def test_reading_a_missing_run_creates_nothing(tmp_path, finished):
    config, _ = finished
    missing = tmp_path / "runs" / "missing"
    for command in (["eval"], ["export", "--out", str(tmp_path / "out")]):
        message = _refusal([*command, str(config), "--run-dir", str(missing)])
        assert str(missing) in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_a_run_directory_in_use_is_refused(run, nothing_built):
    """A second training process on a run directory (here: its lock held by
    another open file description, as another process holds it) is refused,
    naming the holder, before anything is built; once released it trains."""
    from jaxkit.checkpoint.run_dir import exclusive
    args, config, run_dir = run
    with exclusive(run_dir):
        with pytest.raises(SystemExit, match=r"is in use by another training process \(pid \d+\)"):
            main(["train", str(config), *args, "--resume"])
    with exclusive(run_dir):  # released on leaving the block: taken again at once
        pass
