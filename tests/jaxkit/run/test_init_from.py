"""train.init_from: a run starts from exactly the parameters of another
run's latest checkpoint with a fresh optimizer, may change the keys that
leave the parameters' tree and shapes alone, resumes from its own checkpoint
once it has one, and a source that is missing or does not fit is refused in
one line before the model is built."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.config import ConfigError, load_config
from jaxkit.run import trainer as trainer_module
from jaxkit.run.load import load_run
from jaxkit.run.trainer import Trainer, train
from multidevice import TINY

BASE = TINY + ["train.steps=3", "checkpoint.async_save=false"]


def config(*overrides):
    return load_config(None, BASE + list(overrides))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny run trained and saved at step 3."""
    run_dir = tmp_path_factory.mktemp("init_from") / "source"
    train(config(), run_dir=run_dir)
    return run_dir


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if a train state is built (a refusal must come first)."""
    def built(*args, **kwargs):
        raise AssertionError("the train state was built before the refusal")
    monkeypatch.setattr(trainer_module, "build_train_state", built)


def test_starts_from_the_source_parameters_with_a_fresh_optimizer(source, tmp_path):
    # another length and compute dtype: keys that leave the parameters alone
    cfg = config(f"train.init_from={source}", "data.seq_len=16", "model.compute_dtype=bfloat16")
    fine_tune = Trainer(cfg, tmp_path / "fine_tune")
    saved = flat(load_run(config(), source).params)
    params = flat(fine_tune.state["params"])
    assert params.keys() == saved.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    assert int(fine_tune.state["step"]) == 0
    counts = [x for p, x in flat(fine_tune.state["opt_state"]).items() if "count" in p]
    moments = [x for p, x in flat(fine_tune.state["opt_state"]).items() if ".mu" in p or ".nu" in p]
    assert counts and all(int(c) == 0 for c in counts)
    assert moments and all(not m.any() for m in moments)
    fine_tune.fit()
    records = [json.loads(line) for line in (tmp_path / "fine_tune/metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]


def test_parameters_are_cast_to_the_model_dtype(source, tmp_path):
    cfg = config(f"train.init_from={source}", "model.param_dtype=bfloat16")
    params = flat(Trainer(cfg, tmp_path / "bf16").state["params"])
    for name, value in flat(load_run(config(), source).params).items():
        assert params[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(params[name], value.astype(jnp.bfloat16), err_msg=name)


def test_a_random_start_differs(source, tmp_path):
    fresh = flat(Trainer(config(), tmp_path / "fresh").state["params"])
    saved = flat(load_run(config(), source).params)
    assert any(not np.array_equal(fresh[name], value) for name, value in saved.items())


def test_its_own_checkpoint_wins_on_resume(source, tmp_path):
    run_dir = tmp_path / "fine_tune"
    train(config(f"train.init_from={source}", "train.steps=2"), run_dir=run_dir)
    own = flat(load_run(config(), run_dir).params)
    resumed = Trainer(config(f"train.init_from={source}", "train.steps=4"), run_dir)
    assert resumed.restore_latest() == 2
    params = flat(resumed.state["params"])
    for name, value in own.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    assert any(not np.array_equal(own[n], v)
               for n, v in flat(load_run(config(), source).params).items())
    assert resumed.fit(resume=True)["step"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_source_without_checkpoints_is_refused(where, tmp_path, nothing_built):
    bad = tmp_path / where
    if where == "empty":
        bad.mkdir()
    with pytest.raises(ConfigError) as info:
        train(config(f"train.init_from={bad}"), run_dir=tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and f"train.init_from {str(bad)!r}" in message
    assert ("does not exist" if where == "missing" else "holds no checkpoints") in message


def test_a_source_of_another_shape_is_refused(source, tmp_path, nothing_built):
    with pytest.raises(ConfigError) as info:
        Trainer(config(f"train.init_from={source}", "model.mlp_hidden=40"), tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and str(source) in message
    assert "parameter blocks.0.mlp.down.kernel is (48, 32) there and (40, 32) here" in message


def test_a_source_of_another_tree_is_refused(source, tmp_path, nothing_built):
    with pytest.raises(ConfigError, match="is not in this model|is not in it"):
        Trainer(config(f"train.init_from={source}", "model.num_layers=3"), tmp_path / "run")


@pytest.mark.parametrize("overrides, words", [
    (["train.init_from=''"], "train.init_from is empty"),
    (["train.init_from=runs/a", "lora.base=runs/b"], "train.init_from and lora.base"),
])
def test_config_checks(overrides, words):
    with pytest.raises(ConfigError, match=words):
        config(*overrides)
