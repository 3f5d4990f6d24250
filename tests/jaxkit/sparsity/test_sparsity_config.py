"""model.sparsity: a config that cannot be pruned is one line naming the value,
before any model is built; enabled, it prunes exactly the targets' Linears."""
import pytest
from flax import nnx

from jaxkit.config import ConfigError, load_config
from jaxkit.models import Transformer
from jaxkit.sparsity import sparse_linears

ON = "model.sparsity.enabled=true"


@pytest.mark.parametrize("overrides, message", [
    ([ON, "model.sparsity.n=4"], "model.sparsity.n (4) must be < model.sparsity.m (4)"),
    ([ON, "model.sparsity.m=1"], "model.sparsity.m must be >= 2, got 1"),
    ([ON, "model.sparsity.m=3"], "model.sparsity.m (3) must divide the input dimension 256 of "
                                 "target 'q'"),
    ([ON, "model.sparsity.targets=[mlp]", "model.mlp_hidden=1000", "model.sparsity.m=16"],
     "model.sparsity.m (16) must divide the input dimension 1000 of target 'mlp'"),
    ([ON, "model.sparsity.targets=[]"], "model.sparsity.targets is empty: name the projections "
                                        "to prune, among ['q', 'k', 'v', 'o', 'mlp', 'head']"),
    ([ON, "model.sparsity.targets=[experts]"], "model.sparsity.targets[0]: 'experts' is not one "
                                               "of ['q', 'k', 'v', 'o', 'mlp', 'head']"),
    ([ON, "model.sparsity.srste_decay=-1"], "model.sparsity.srste_decay must be >= 0, got -1.0"),
    ([ON, "model.quant.mode=int", "model.quant.weight_format=int8",
      "model.quant.activation_format=int8"],
     "model.sparsity trains from scratch: it needs model.quant.mode 'none' or 'qat', got 'int'"),
    ([ON, "model.quant.mode=qat", "model.quant.weight_format=mxfp4", "model.quant.hadamard=true"],
     "model.sparsity with model.quant.hadamard: the rotated weights are not N:M sparse; set "
     "model.quant.hadamard=false"),
    ([ON, "lora.base=runs/base"], "model.sparsity trains the whole model from scratch; it "
                                  "cannot be combined with lora.base"),
])
def test_bad_sparsity_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_disabled_sparsity_checks_ranges_only():
    load_config(None, ["model.sparsity.m=3"])  # enabled: false, nothing is pruned
    with pytest.raises(ConfigError, match="model.sparsity.n must be >= 1, got 0"):
        load_config(None, ["model.sparsity.n=0"])


@pytest.mark.parametrize("targets, count", [("[q,k,v,o,mlp]", 2 * 7), ("[o]", 2), ("[mlp]", 6)])
def test_targets_choose_the_linears(targets, count):
    cfg = load_config(None, [ON, f"model.sparsity.targets={targets}", "model.num_layers=2"])
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    assert len(sparse_linears(model)) == count
    assert {lin.target for lin in sparse_linears(model)} <= set(cfg.model.sparsity.targets)
