"""The linear learning-rate schedule: warmup, then a straight line from the
peak to learning_rate * min_lr_ratio (0: linear decay to zero, D2Z); the
first moment's storage dtype."""
import jax
import jax.numpy as jnp
import pytest

from jaxkit.config import OptimizerConfig, load_config
from jaxkit.train.optim import make_optimizer, make_schedule


def linear_schedule(min_lr_ratio: float, warmup: int = 10, steps: int = 110):
    cfg = load_config(None, ["optimizer.schedule=linear", f"optimizer.warmup_steps={warmup}",
                             "optimizer.learning_rate=2.0", f"optimizer.min_lr_ratio={min_lr_ratio}"])
    return make_schedule(cfg.optimizer, steps)


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_linear_decays_in_a_straight_line_to_the_floor(min_lr_ratio):
    lr = linear_schedule(min_lr_ratio)
    floor = 2.0 * min_lr_ratio
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1.0)  # warmup
    assert float(lr(10)) == pytest.approx(2.0)
    for step in (35, 60, 85):  # 100 decay steps after the warmup
        assert float(lr(step)) == pytest.approx(2.0 + (floor - 2.0) * (step - 10) / 100, abs=1e-6)
    assert float(lr(110)) == pytest.approx(floor, abs=1e-6)


def test_linear_without_warmup_starts_at_the_peak():
    lr = linear_schedule(0.0, warmup=0, steps=50)
    assert float(lr(0)) == pytest.approx(2.0)
    assert float(lr(25)) == pytest.approx(1.0)
    assert float(lr(50)) == 0.0


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_bf16_first_moment_is_stored_in_bf16(name):
    cfg = OptimizerConfig(name=name, mu_dtype="bfloat16")
    params = {"w": jnp.ones((4, 3), jnp.float32)}
    state = make_optimizer(cfg, total_steps=10).init(params)
    mus = [leaf for leaf in jax.tree.leaves(state) if getattr(leaf, "shape", None) == (4, 3)]
    assert jnp.dtype(jnp.bfloat16) in {m.dtype for m in mus}
    if name == "adamw":  # the second moment stays float32
        assert jnp.dtype(jnp.float32) in {m.dtype for m in mus}


def test_adafactor_refuses_a_first_moment_dtype():
    with pytest.raises(ValueError, match="optimizer.mu_dtype 'bfloat16' applies to adamw"):
        load_config(None, ["optimizer.name=adafactor", "optimizer.mu_dtype=bfloat16"])
