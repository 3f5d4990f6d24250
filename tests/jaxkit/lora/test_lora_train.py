"""LoRA training runs on a tiny base run: they start at the base's logits,
train only the adapters (the base bitwise unchanged) and fit a batch,
checkpoint the adapters and their optimizer state alone, resume exactly, and
export a merged model that `jaxkit generate --params` and `jaxkit convert
jaxkit-to-hf --params` read. A base that does not fit the config is one line."""
import dataclasses
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from lora_runs import (config, fit, flat_values, logits, lora_config, model_state_of,
                       train_losses)

from jaxkit.config import ConfigError
from jaxkit.lora import Frozen
from jaxkit.models import unscan_layers
from jaxkit.run.convert import convert_jaxkit_to_hf
from jaxkit.run.evaluate import evaluate_run
from jaxkit.run.export import export_run
from jaxkit.run.load import load_model, load_run
from jaxkit.run.lora import build_lora_model, load_lora_run

STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(directory, base config, LoRA config, LoRA trainer): a base run of 3
    steps and a LoRA run of STEPS steps on it fitting one batch."""
    tmp = tmp_path_factory.mktemp("lora_train")
    base_cfg = config("train.steps=3")
    fit(base_cfg, tmp / "base")
    cfg = lora_config(tmp / "base", f"train.steps={STEPS}", "checkpoint.every=4")
    return tmp, base_cfg, cfg, fit(cfg, tmp / "lora", one_batch=True)


def base_params(tmp, base_cfg) -> dict:
    return flat_values(load_run(base_cfg, tmp / "base").params)


def test_fresh_adapters_give_the_base_logits_exactly(runs):
    tmp, base_cfg, cfg, _ = runs
    np.testing.assert_array_equal(logits(build_lora_model(cfg)),
                                  logits(load_run(base_cfg, tmp / "base").model()))


def test_training_changes_only_the_adapters_and_fits_the_batch(runs):
    tmp, base_cfg, _, trainer = runs
    frozen = model_state_of(trainer, Frozen)
    # a wrapped projection's kernel sits under its LoRALinear's "base"
    unwrapped = {tuple(k for k in path if k != "base"): v for path, v in frozen.items()}
    base = base_params(tmp, base_cfg)
    assert unwrapped.keys() == base.keys()
    for path, value in base.items():
        np.testing.assert_array_equal(unwrapped[path], value, err_msg=str(path))
    adapters = model_state_of(trainer, nnx.Param)
    assert len(adapters) == 2 * 7 * 2 and all(v.dtype == np.float32 for v in adapters.values())
    assert all(np.abs(v).max() > 0 for path, v in adapters.items() if path[-1] == "lora_b")
    losses = train_losses(tmp / "lora")
    assert len(losses) == STEPS and losses[-1] < 0.7 * losses[0], losses


def _checkpoint_arrays(step_dir) -> dict:
    """{path string: shape} of every array a checkpoint step holds."""
    import jax
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "default").item_metadata.tree
    return {jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_checkpoint_holds_only_the_adapters_and_their_optimizer_state(runs):
    tmp, _, _, _ = runs
    arrays = _checkpoint_arrays(tmp / "lora" / "checkpoints" / str(STEPS))
    params = [p for p in arrays if p.startswith("['params']")]
    assert len(params) == 2 * 7 * 2 and all(p.endswith(("['lora_a']['value']",
                                                        "['lora_b']['value']")) for p in params)
    moments = [p for p in arrays if p.startswith("['opt_state']") and arrays[p]]
    assert moments and all("lora_" in p for p in moments)  # adam's mu and nu of the adapters
    assert not [p for p in arrays if p.startswith("['model_state']")]
    assert sum(np.prod(s) for s in arrays.values()) < 3 * sum(
        np.prod(arrays[p]) for p in params) + 10  # adapters, two moments, counters


def test_resume_is_exact_with_dropout(runs, tmp_path):
    tmp, *_ = runs
    cfg = lambda steps: lora_config(tmp / "base", f"train.steps={steps}", "checkpoint.every=3",
                                    "lora.dropout=0.2")
    straight = fit(cfg(6), tmp_path / "straight")
    fit(cfg(3), tmp_path / "resumed")
    resumed = fit(cfg(6), tmp_path / "resumed", resume=True)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    arrays = _checkpoint_arrays(tmp_path / "resumed" / "checkpoints" / "6")
    rng = [p for p in arrays if p.startswith("['model_state']")]
    assert rng and all(p.endswith("['rng']['value']") for p in rng)  # the dropout keys
    for kind in (nnx.Param, nnx.Variable):
        want, got = model_state_of(straight, kind), model_state_of(resumed, kind)
        assert want.keys() == got.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_export_merges_and_generate_and_convert_read_it(runs, tmp_path):
    tmp, _, cfg, _ = runs
    assert export_run(cfg, tmp / "lora", tmp_path / "merged") == STEPS
    model, step = load_lora_run(cfg, tmp / "lora")
    unmerged = logits(model)
    merged = load_model(cfg, params=tmp_path / "merged")  # as `jaxkit generate --params` loads it
    # merging moves (alpha/r) A @ B into W: float32 rounding of the reordered sums
    np.testing.assert_allclose(logits(merged), unmerged, rtol=1e-5, atol=1e-5)
    assert np.abs(unmerged - logits(build_lora_model(cfg))).max() > 1e-2  # the adapters count
    summary = convert_jaxkit_to_hf(cfg, tmp_path / "hf", params=tmp_path / "merged")
    assert summary["architecture"] == "LlamaForCausalLM"
    from safetensors.numpy import load_file
    q = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, np.asarray(merged.blocks[0].attn.q.kernel[...]).T)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 32


def test_a_jaxkit_export_directory_is_a_base(runs, tmp_path):
    tmp, base_cfg, cfg, _ = runs
    export_run(base_cfg, tmp / "base", tmp_path / "base_params")
    from_export = build_lora_model(dataclasses.replace(
        cfg, lora=dataclasses.replace(cfg.lora, base=str(tmp_path / "base_params"))))
    np.testing.assert_array_equal(logits(from_export),
                                  logits(load_run(base_cfg, tmp / "base").model()))


def test_commands_that_read_whole_checkpoints_refuse_a_lora_run(runs):
    tmp, _, cfg, _ = runs
    for read in (lambda: evaluate_run(cfg, tmp / "lora"), lambda: load_run(cfg, tmp / "lora")):
        with pytest.raises(ConfigError, match=r"holds a LoRA run \(lora.base is set\)") as err:
            read()
        assert "\n" not in str(err.value)


def test_a_base_run_with_scanned_layers_loads_unrolled(tmp_path):
    scanned = config("train.steps=1", "model.scan_layers=true")
    fit(scanned, tmp_path / "base")
    want = logits(unscan_layers(load_run(scanned, tmp_path / "base").model()))
    np.testing.assert_array_equal(logits(build_lora_model(lora_config(tmp_path / "base"))), want)


def test_a_base_that_does_not_fit_is_one_line(runs, tmp_path):
    tmp, base_cfg, _, _ = runs
    cases = [
        (lora_config(tmp / "base", "model.mlp_hidden=64"),
         r"lora.base '.*base' was trained with a different model.mlp_hidden \(48, now 64\)"),
        (lora_config(tmp / "base", "model.quant.mode=int", "model.quant.weight_format=int8",
                     "model.quant.activation_format=int8"),
         r"lora.base '.*base' is a training run, whose weights are float"),
        (lora_config(tmp_path / "missing"), r"lora.base '.*missing' does not exist"),
    ]
    export_run(base_cfg, tmp / "base", tmp_path / "base_params")
    cases.append((lora_config(tmp_path / "base_params", "model.d_model=64"),
                  r"lora.base: the arrays in .*base_params do not fit the model the config "))
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            build_lora_model(cfg)
        assert "\n" not in str(err.value)
