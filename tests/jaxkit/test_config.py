"""Config loading: YAML, overrides with type conversion, and every error path."""
import dataclasses
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from jaxkit.config import Config, ConfigError, check_ranges, load_config, save_config

CONFIGS = sorted(Path(__file__).parents[2].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_overrides_convert_types():
    cfg = load_config(None, ["model.d_model=128", "optimizer.learning_rate=1e-3",
                             "model.tie_embeddings=false", "model.num_kv_heads=null",
                             "model.moe.router=expert_choice", "model.quant.targets=q,mlp",
                             "optimizer.clip_norm=none", "model.attention.logit_softcap=30"])
    assert cfg.model.d_model == 128 and cfg.optimizer.learning_rate == 1e-3
    assert cfg.model.tie_embeddings is False and cfg.model.num_kv_heads is None
    assert cfg.model.moe.router == "expert_choice" and cfg.model.quant.targets == ("q", "mlp")
    assert cfg.optimizer.clip_norm is None and cfg.model.attention.logit_softcap == 30.0


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["model.num_layers=3", "mesh.rules={embed: fsdp}"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=3", "unknown config key 'model.d_modle'; did you mean model.d_model"),
    ("modle.d_model=3", "unknown config key 'modle'; did you mean model"),
    ("model.d_model=abc", "model.d_model: expected an integer, got 'abc'"),
    ("model.d_model=1.5", "model.d_model: expected an integer, got 1.5"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings: expected true/false"),
    ("model.moe.router=topk", "model.moe.router: 'topk' is not one of"),
    ("model.num_heads=3", "model.num_heads (3) must divide model.d_model (256)"),
    ("model.num_kv_heads=3", "model.num_kv_heads (3) must divide model.num_heads (4)"),
    ("model.d_model=0", "model.d_model must be >= 1, got 0"),
    ("data.seq_len=4096", "data.seq_len (4096) exceeds model.max_seq_len (256)"),
    ("train.grad_accum=3", "train.grad_accum (3) must divide data.batch_size (16)"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate must be > 0"),
    ("mesh.fsdp=0", "mesh.fsdp must be -1 or >= 1, got 0"),
    ("model.attention.sliding_window=0", "sliding_window must be >= 1, got 0"),
    ("model.d_model", "expected key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


def numeric_fields(cls=Config, prefix=""):
    """(key, section class, field name, int or float, declared range or None)
    of every numeric field of every config section, read from the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        options = (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType)
                   else (tp,))
        kinds = [t for t in options if t in (int, float)]
        if kinds:
            yield f"{prefix}{f.name}", cls, f.name, kinds[0], f.metadata.get("range")


NUMERIC = list(numeric_fields())


def _step(kind, value, direction):
    """The neighbouring representable value of the key's type."""
    return int(value) + direction if kind is int else math.nextafter(value, direction * math.inf)


def just_outside(kind, valid):
    bounds = [(valid.low, valid.low_open, -1), (valid.high, valid.high_open, 1)]
    values = [kind(bound) if is_open else _step(kind, bound, direction)
              for bound, is_open, direction in bounds if math.isfinite(bound)]
    return [v for v in values if v not in valid.special]


def just_inside(kind, valid):
    bounds = [(valid.low, valid.low_open, 1), (valid.high, valid.high_open, -1)]
    return [_step(kind, bound, direction) if is_open else kind(bound)
            for bound, is_open, direction in bounds if math.isfinite(bound)] + list(valid.special)


def test_every_numeric_key_declares_its_range():
    assert len(NUMERIC) > 50
    assert [key for key, *_, valid in NUMERIC if valid is None] == []
    assert all(just_outside(kind, valid) for _, _, _, kind, valid in NUMERIC)


@pytest.mark.parametrize("key, cls, name, kind, valid", NUMERIC, ids=[n[0] for n in NUMERIC])
def test_every_range_is_enforced(key, cls, name, kind, valid):
    """Values just outside the range are refused by name, in one line, before
    anything else; values at its edges pass; NaN and infinity never do."""
    refused = just_outside(kind, valid) + ([math.nan, math.inf, -math.inf] if kind is float else [])
    for value in refused:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={value!r}"])
        message = str(err.value)
        assert message.startswith(f"{key} must be ") and "\n" not in message, (value, message)
    for value in just_inside(kind, valid):
        check_ranges(dataclasses.replace(cls(), **{name: value}))


def test_yaml_syntax_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  num_layers: [2\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: invalid YAML at line 4, column 1: ") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^--set model.num_layers: invalid YAML at line 1"):
        load_config(None, ["model.num_layers={2"])
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=mqar", "data.document_mask=true"], "data.document_mask applies to data.kind"),
    (["model.attention.implementation=cudnn", "data.document_mask=true"],
     "'cudnn' does not take"),
])
def test_document_mask_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_moe_errors():
    with pytest.raises(ConfigError, match=r"model.moe.top_k \(9\) must be in \[1, num_experts=8\]"):
        load_config(None, ["model.moe.num_experts=8", "model.moe.top_k=9"])
    with pytest.raises(ConfigError, match=r"num_groups \(3\) must divide num_experts \(8\)"):
        load_config(None, ["model.moe.num_experts=8", "model.moe.num_groups=3"])


def test_unknown_yaml_key_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": {"num_layer": 2}}))
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_print_config_and_error():
    cmd = [sys.executable, "-m", "jaxkit.cli", "train", "configs/quickstart.yaml",
           "--set", "model.num_layers=7", "--print-config"]
    root = Path(__file__).parents[2]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True).stdout
    assert yaml.safe_load(out)["model"]["num_layers"] == 7
    bad = subprocess.run(cmd[:-1] + ["--set", "model.d_modle=1"], capture_output=True,
                         text=True, cwd=root)
    assert bad.returncode != 0 and "did you mean model.d_model" in bad.stderr


HEAVY = ("jax", "flax", "pallas_kernels")


def test_config_handling_never_imports_jax():
    """Loading every shipped config, --print-config and a config error leave
    jax, flax and the kernels unimported (checked after each, in a fresh
    interpreter)."""
    script = f"""
import sys
from pathlib import Path
from jaxkit.cli import main
from jaxkit.config import ConfigError, load_config
def heavy(what):
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
    assert not loaded, f"{{what}} imported {{loaded}}"
for path in sorted(Path("configs").glob("*.yaml")):
    load_config(path)
    heavy(f"load_config({{path}})")
    for command in ("train", "eval", "quantize"):
        try:
            main([command, str(path), "--print-config"])
        except SystemExit as e:
            assert e.code == 0, e.code
        heavy(f"jaxkit {{command}} {{path}} --print-config")
try:
    main(["train", "configs/quickstart.yaml", "--set", "data.seq_len=4096"])
except SystemExit as e:
    assert str(e.code).startswith("config error: data.seq_len (4096)"), e.code
heavy("a config error")
print("ok")
"""
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("command", ["train", "eval", "export", "quantize"])
@pytest.mark.parametrize("overrides, message", [
    (["mesh.rules={embed: fdsp}"], "mesh.rules.embed: unknown mesh axis 'fdsp'"),
    (["model.quant.mode=int", "model.quant.weight_format=mxfp4"],
     "model.quant: mode 'int' has no kernel for weight_format='mxfp4'"),
], ids=["rules", "quant"])
def test_cross_package_config_errors_come_first(command, overrides, message, tmp_path):
    """Errors of the checks that need the sharding and quant packages: one
    line, before anything is written or compiled (jax logs every compilation)."""
    root = Path(__file__).parents[2]
    cmd = [sys.executable, "-m", "jaxkit.cli", command, "configs/quickstart.yaml",
           "--run-dir", str(tmp_path / "run"), "--set", f"data.path={tmp_path / 'none'}"]
    cmd += [a for o in overrides for a in ("--set", o)]
    cmd += ["--out", str(tmp_path / "out")] if command in ("export", "quantize") else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu"))
    lines = out.stderr.splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("config error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_readme_config_reference_is_current():
    from jaxkit.config import reference_markdown
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate the README's config reference"
