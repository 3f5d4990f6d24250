"""A lora section that cannot run is one line naming the key, from the config
loader or, for a base that is not there, from `jaxkit train` before
anything compiles."""
import pytest
from lora_runs import TINY

from jaxkit.cli import main
from jaxkit.config import ConfigError, load_config

BAD = [
    (["lora.base=b", "lora.targets=q,gate_proj"],
     "lora.targets[1]: 'gate_proj' is not one of ['q', 'k', 'v', 'o', 'gate', 'up', 'down']"),
    (["lora.base=b", "lora.rank=0"], "lora.rank must be >= 1, got 0"),
    (["lora.base=b", "lora.alpha=0"], "lora.alpha must be > 0, got 0.0"),
    (["lora.base=b", "lora.dropout=1"], "lora.dropout must be in [0, 1), got 1.0"),
    (["lora.base=b", "lora.init=xavier"], "lora.init: 'xavier' is not one of"),
    (["lora.rank=16", "lora.targets=q"], "lora.rank, lora.targets are set but lora.base is not"),
    (["lora.base=b", "lora.targets=[]"], "lora.targets is empty"),
    (["lora.base=b", "lora.targets=q,v,q"], "lora.targets names 'q' more than once"),
    (["lora.base=b", "model.scan_layers=true"], "lora needs model.scan_layers=false"),
    (["lora.base=b", "model.quant.mode=qat", "model.quant.weight_format=int8"],
     "lora needs model.quant.mode 'none' (a float base) or 'int'"),
    (["lora.base=b", "model.moe.num_experts=4", "model.moe.router=sigmoid_bias"],
     "lora keeps the base frozen, but router 'sigmoid_bias' updates its balancing bias"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_lora_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, TINY + overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["lora.base=b", "lora.targets=q,x"], "config error: lora.targets[1]: 'x' is not one of"),
    (["lora.base=b", "lora.rank=0"], "config error: lora.rank must be >= 1, got 0"),
    (["lora.base={tmp}/missing"], "config error: lora.base '{tmp}/missing' does not exist"),
])
def test_jaxkit_train_refuses_before_compiling(overrides, message, tmp_path, capsys):
    sets = [a for o in TINY + [o.format(tmp=tmp_path) for o in overrides] for a in ("--set", o)]
    with pytest.raises(SystemExit) as stop:
        main(["train", "configs/quickstart.yaml", *sets, "--run-dir", str(tmp_path / "run")])
    assert str(stop.value).startswith(message.format(tmp=tmp_path))
    assert "\n" not in str(stop.value)
    assert "compiled" not in capsys.readouterr().out
