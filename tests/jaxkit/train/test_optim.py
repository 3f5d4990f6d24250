"""The linear learning-rate schedule: warmup, then a straight line from the
peak to learning_rate * min_lr_ratio (0: linear decay to zero, D2Z)."""
import pytest

from jaxkit.config import load_config
from jaxkit.train.optim import make_schedule


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
