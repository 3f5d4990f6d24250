"""Non-finite losses: a fault test feeds NaN into the loss (a NaN loss weight
in chosen batches) and checks both train.nonfinite policies. stop: the run
raises NonFiniteLoss naming the first bad step and saves nothing from it on;
skip: bad steps leave params and optimizer state bit-identical and are
counted. Through the command line, a learning rate of 1e3 exits non-zero
with one line, its checkpoints all finite."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.checkpoint import Checkpointer
from jaxkit.config import load_config
from jaxkit.run.build import build_data, build_model, build_optimizer, split_model
from jaxkit.run.trainer import Trainer
from jaxkit.train.step import NonFiniteLoss, all_finite, make_train_step

ROOT = Path(__file__).parents[3]
# A one-layer model on the MQAR task (synthetic, no files), float32 compute.
TINY = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
        "model.mlp_hidden=48", "model.max_seq_len=32", "model.compute_dtype=float32",
        "data.kind=mqar", "data.seq_len=32", "data.batch_size=8", "data.mqar_vocab_size=64",
        "data.mqar_num_kv_pairs=4", "train.eval_every=0", "train.progress=false",
        "optimizer.warmup_steps=2", "checkpoint.async_save=false"]


class NaNLossAt:
    """A data source whose batches at `steps` (0-based batch indices) carry a
    NaN loss weight, so their loss and gradients are NaN."""

    def __init__(self, source, steps):
        self.source, self.steps = source, set(steps)

    def batch(self, step, **kw):
        batch = dict(self.source.batch(step, **kw))
        if step in self.steps:
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, 0] = np.nan
        return batch


def trainer(tmp_path, overrides, nan_at):
    cfg = load_config(None, TINY + overrides)
    train_src, eval_src = build_data(cfg)
    return Trainer(cfg, tmp_path / "run", sources=(NaNLossAt(train_src, nan_at), eval_src))


def train_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def saved_params(run: Path, cfg, like) -> dict:
    """{step: params} of every checkpoint in the run directory."""
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            like)
    try:
        return {s: ckpt.restore(s, abstract)["params"] for s in ckpt.manager.all_steps()}
    finally:
        ckpt.close()


def test_step_skips_a_nonfinite_batch_bit_exactly():
    cfg = load_config(None, TINY)
    graphdef, _, params, model_state = split_model(build_model(cfg))
    optimizer, schedule = build_optimizer(cfg)
    state = dict(params=params, opt_state=optimizer.init(params), model_state=model_state,
                 step=jnp.zeros((), jnp.int32))
    source = NaNLossAt(build_data(cfg)[0], steps=[1])
    good, bad = (jax.tree.map(jnp.asarray, source.batch(i)) for i in (0, 1))
    step = lambda skip: jax.jit(make_train_step(graphdef, optimizer, schedule, grad_accum=1,
                                                z_loss=0.0, skip_nonfinite=skip))
    plain, skipping = step(False), step(True)
    leaves = lambda s: jax.tree.leaves({k: s[k] for k in ("params", "opt_state", "model_state")})

    # all finite: skipping changes no bit of the update
    after_plain, m_plain = plain(state, good)
    after_skip, m_skip = skipping(state, good)
    assert bool(m_plain["finite"]) and bool(m_skip["finite"])
    for a, b in zip(leaves(after_plain), leaves(after_skip), strict=True):
        np.testing.assert_array_equal(a, b)

    # NaN in the loss: skipped, every array of the state as it was; step advances
    skipped, metrics = skipping(after_skip, bad)
    assert not bool(metrics["finite"]) and np.isnan(metrics["loss"])
    assert int(skipped["step"]) == 2
    for a, b in zip(leaves(skipped), leaves(after_skip), strict=True):
        np.testing.assert_array_equal(a, b)
    assert bool(all_finite(skipped["params"]))
    # without skipping, the NaN reaches the parameters
    poisoned, metrics = plain(after_plain, bad)
    assert not bool(metrics["finite"]) and not bool(all_finite(poisoned["params"]))


def test_stop_names_the_first_nonfinite_step_and_keeps_finite_checkpoints(tmp_path):
    # NaN at the 4th step; logs at even steps, checkpoints every 3 steps
    t = trainer(tmp_path, ["train.steps=9", "train.log_every=2", "checkpoint.every=3"], nan_at=[3])
    with pytest.raises(NonFiniteLoss, match=r"not finite at step 4 \(found at step 4;.*"
                                            r"last finite checkpoint: step 3\)"):
        t.fit()
    run = tmp_path / "run"
    assert [(r["step"], r["nonfinite_steps"]) for r in train_records(run)] == [(2, 0), (4, 1)]
    saved = saved_params(run, t.cfg, t.state)
    assert sorted(saved) == [3]
    assert all(bool(all_finite(p)) for p in saved.values())


def test_stop_checks_before_a_checkpoint_between_log_steps(tmp_path):
    # NaN at step 5, a checkpoint due at step 6, the next log at step 8
    t = trainer(tmp_path, ["train.steps=8", "train.log_every=4", "checkpoint.every=2"], nan_at=[4])
    with pytest.raises(NonFiniteLoss, match=r"not finite at step 5 \(found at step 6;"):
        t.fit()
    saved = saved_params(tmp_path / "run", t.cfg, t.state)
    assert sorted(saved) == [2, 4]
    assert all(bool(all_finite(p)) for p in saved.values())


def test_skip_continues_and_counts_skipped_steps(tmp_path):
    t = trainer(tmp_path, ["train.steps=6", "train.log_every=3", "checkpoint.every=3",
                           "train.nonfinite=skip"], nan_at=[1, 4])
    result = t.fit()
    assert result["step"] == 6 and not result["stopped_early"]
    run = tmp_path / "run"
    assert [(r["step"], r["nonfinite_steps"]) for r in train_records(run)] == [(3, 1), (6, 2)]
    saved = saved_params(run, t.cfg, t.state)
    assert sorted(saved) == [3, 6] and all(bool(all_finite(p)) for p in saved.values())
    # parameters that are not finite are never saved, whatever the policy
    t.state["params"] = jax.tree.map(lambda x: x * jnp.nan, t.state["params"])
    with pytest.raises(NonFiniteLoss, match="parameters not finite after step 6"):
        t._stop_if_nonfinite(6, saving=True)


def test_cli_exits_with_one_line_at_learning_rate_1e3(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("")
    overrides = [a for o in TINY + ["optimizer.learning_rate=1e3", "train.steps=20",
                                    "train.log_every=5", "checkpoint.every=2"]
                 for a in ("--set", o)]
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 "
               "--xla_llvm_disable_expensive_passes=true")
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", "train", str(config), *overrides,
                          "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0, out.stderr[-3000:]
    match = re.fullmatch(r"training stopped: loss or gradient norm not finite at step (\d+) "
                         r"\(found at step \d+; .*", last)
    assert match, out.stderr[-3000:]
    first = int(match[1])
    cfg = load_config(None, TINY)
    like = Trainer(cfg, tmp_path / "like").state
    saved = saved_params(tmp_path / "run", cfg, like)
    assert saved and max(saved) < first
    assert all(bool(all_finite(p)) for p in saved.values())


def test_a_log_step_is_read_once_the_next_step_is_dispatched(tmp_path, monkeypatch):
    """The host reads a log step's metrics (a sync) after dispatching the next
    step, so the device is not idle while it logs; at once where the state is
    needed next: a checkpoint (step 6) and the last step (7)."""
    t = trainer(tmp_path, ["train.steps=7", "train.log_every=2", "checkpoint.every=6"], nan_at=[])
    dispatched, reads = [], []
    run_step = t.run_step
    monkeypatch.setattr(t, "run_step", lambda fn, step: dispatched.append(step) or run_step(fn, step))
    device_get = jax.device_get

    def get(x):
        if isinstance(x, dict) and "nonfinite_first" in x:  # a train step's metrics
            reads.append(len(dispatched))
        return device_get(x)
    monkeypatch.setattr(jax, "device_get", get)
    t.fit()
    assert reads == [3, 5, 6, 7]
    assert [r["step"] for r in train_records(tmp_path / "run")] == [2, 4, 6, 7]
    assert all("nonfinite_first" not in r for r in train_records(tmp_path / "run"))
