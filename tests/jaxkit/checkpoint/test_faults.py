"""Fault injection: training killed (SIGKILL) at seeded random points, one of
them while an async save is in flight and one between orbax finishing a
save and its checksums, resumes to the parameters of an uninterrupted run,
bit for bit; checkpoint files flipped, truncated or deleted are detected,
the newest intact checkpoint is used with a one-line warning naming the
skipped step and file, and a one-line error names them when none is intact."""
import logging
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.checkpoint import Checkpointer, DamagedCheckpointError
from jaxkit.config import CheckpointConfig, load_config, save_config
from jaxkit.run.cli import main
from jaxkit.run.trainer import Trainer
from multidevice import TINY, load_tree, worker_env

STEPS, EVERY = 12, 2
RUN = TINY + [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep_last=2"]
SEED = 20261206
# Kill points, in order along one run: a batch being drawn (mid-step), just
# after a save started (the async write in flight), and just before the
# checksums of a finished save are written.
_rng = random.Random(SEED)
KILLS = [f"step:{_rng.randint(2, 5)}", f"save:{_rng.choice([6, 8])}", "checksums:10"]


def _worker(run_dir: Path, kill: str, cache) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, str(run_dir), kill],
                          env=worker_env(1, cache), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compile_cache) -> Path:
    """ref: trained straight through; killed: the same run killed at KILLS in
    turn, each time resumed by a new process, then resumed to the end."""
    out = tmp_path_factory.mktemp("faults")
    proc = _worker(out / "ref", "none", compile_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kill in KILLS:
        proc = _worker(out / "killed", kill, compile_cache)
        assert proc.returncode == -signal.SIGKILL, f"{kill}: {proc.stderr[-3000:]}"
    proc = _worker(out / "killed", "none", compile_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "killed" / "stderr.txt").write_text(proc.stderr)
    return out


def test_killed_run_resumes_bit_exactly(runs):
    ref, killed = load_tree(runs / "ref" / "params.npz"), load_tree(runs / "killed" / "params.npz")
    assert ref.keys() == killed.keys()
    for k in ref:
        np.testing.assert_array_equal(killed[k], ref[k], err_msg=f"{k} (kills {KILLS})")
    # the kill before the checksums of step 10 left it unverified: the last
    # resume went back to step 8 and said so, then saved 10 anew
    assert "skipping damaged checkpoint step 10" in (runs / "killed" / "stderr.txt").read_text()
    ckpt = Checkpointer(runs / "killed" / "checkpoints", CheckpointConfig(), read_only=True)
    assert ckpt.manager.all_steps() == [10, 12]
    for step in (10, 12):
        ckpt.verify(step)
    ckpt.close()


# ------------------------------------------------------------ damaged files

def _data_file(step_dir: Path) -> Path:
    """The largest array data file of a checkpoint step."""
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def flip(path: Path):
    data = bytearray(path.read_bytes())
    n = min(4096, len(data) // 2)
    data[len(data) // 4:len(data) // 4 + n] = bytes(b ^ 0xFF for b in data[len(data) // 4:][:n])
    path.write_bytes(bytes(data))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def delete(path: Path):
    path.unlink()


def _saved(tmp_path, steps=(1, 2)) -> dict:
    state = {"w": jnp.arange(4096.0).reshape(64, 64), "step": jnp.int32(0)}
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    for step in steps:
        ckpt.save(step, {**state, "step": jnp.int32(step)})
    ckpt.close()
    return state


@pytest.mark.parametrize("damage", [flip, truncate, delete], ids=lambda f: f.__name__)
def test_damaged_latest_falls_back_with_one_warning(tmp_path, caplog, damage):
    state = _saved(tmp_path)
    bad = _data_file(tmp_path / "2")
    damage(bad)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    with pytest.raises(DamagedCheckpointError, match=str(bad)):
        ckpt.verify(2)
    with caplog.at_level(logging.WARNING, logger="jaxkit"):
        assert ckpt.latest_verified_step() == 1
    [warning] = [r.getMessage() for r in caplog.records if r.name.startswith("jaxkit")]
    assert "step 2" in warning and str(bad) in warning and "\n" not in warning
    restored = ckpt.restore(1, jax.eval_shape(lambda: state))
    assert int(restored["step"]) == 1
    ckpt.close()


def test_no_intact_checkpoint_is_a_one_line_error(tmp_path):
    _saved(tmp_path)
    flip(_data_file(tmp_path / "1"))
    (tmp_path / "2" / "checksums.json").unlink()  # as if killed before the checksums
    ckpt = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    with pytest.raises(DamagedCheckpointError) as info:
        ckpt.latest_verified_step()
    message = str(info.value)
    assert "\n" not in message and "step 2" in message and "checksums.json" in message
    assert "step 1" in message and str(_data_file(tmp_path / "1")) in message
    ckpt.close()


def test_a_damaged_step_is_saved_anew(tmp_path):
    state = _saved(tmp_path)
    flip(_data_file(tmp_path / "2"))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    ckpt.save(2, {**state, "step": jnp.int32(-2)})
    ckpt.close()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    assert ckpt.latest_verified_step() == 2
    assert int(ckpt.restore(2, jax.eval_shape(lambda: state))["step"]) == -2
    ckpt.close()


def _damaged_run(runs, tmp_path, *steps) -> tuple[list[str], Path]:
    """A copy of the reference run with the data file of each of `steps`
    flipped; the arguments of `jaxkit train --resume` on it."""
    run = tmp_path / "run"
    shutil.copytree(runs / "ref", run)
    for step in steps:
        flip(_data_file(run / "checkpoints" / str(step)))
    config = tmp_path / "tiny.yaml"
    save_config(load_config(None, RUN), config)
    return ["train", str(config), "--run-dir", str(run), "--resume"], run


def test_resume_skips_a_damaged_latest_checkpoint(runs, tmp_path, caplog):
    _, run = _damaged_run(runs, tmp_path, STEPS)
    t = Trainer(load_config(None, RUN), run)
    with caplog.at_level(logging.WARNING, logger="jaxkit"):
        assert t.restore_latest() == STEPS - EVERY
    t.checkpointer.close()
    [warning] = [r.getMessage() for r in caplog.records if r.name.startswith("jaxkit")]
    assert f"step {STEPS}: " in warning and "checksum mismatch" in warning
    assert f"using step {STEPS - EVERY}" in warning


def test_resume_with_no_intact_checkpoint_is_a_one_line_error(runs, tmp_path):
    args, run = _damaged_run(runs, tmp_path, STEPS - EVERY, STEPS)
    before = (run / "config.yaml").read_text()
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value)
    assert message.startswith("no intact checkpoint under") and "\n" not in message
    assert str(_data_file(run / "checkpoints" / str(STEPS))) in message
    assert (run / "config.yaml").read_text() == before  # a failed resume leaves it as it was


# ------------------------------------------------------------------ worker

def worker(run_dir: Path, kill: str):
    """Trains RUN into run_dir (resuming what is there), SIGKILLed at `kill`
    (KIND:STEP, or none); at the end writes params.npz."""
    import os

    from jaxkit.checkpoint import manager
    from jaxkit.run import build, trainer
    from multidevice import save_params

    kind, _, at = kill.partition(":")
    at = int(at or -1)

    def die(now: bool):
        if now:
            os.kill(os.getpid(), signal.SIGKILL)

    draw, save, write = build.Batches.train, manager.Checkpointer.save, manager.write_checksums

    def draw_or_die(self, step):
        die(kind == "step" and step == at)
        return draw(self, step)

    def save_then_die(self, step, state):
        save(self, step, state)
        die(kind == "save" and step == at)

    def die_or_write(step_dir):
        die(kind == "checksums" and step_dir.name == str(at))
        write(step_dir)

    build.Batches.train, manager.Checkpointer.save = draw_or_die, save_then_die
    manager.write_checksums = die_or_write
    t = trainer.Trainer(load_config(None, RUN), run_dir)
    t.fit(resume=True)
    save_params(t, run_dir / "params.npz")

if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
