"""A sweep whose later run starts (train.init_from) from an earlier run's
directory under the sweep's out folder: the sweep resolves before the source
exists, runs the source first, and the later run starts from its final
parameters."""
import jax
import numpy as np
from tiny_sweep import train_env, write_sweep  # noqa: F401 - fixtures

from jaxkit.config import load_config
from jaxkit.run.cli import main
from jaxkit.run.load import load_run
from jaxkit.sweep.plan import load_sweep


def test_a_run_starts_from_an_earlier_run_of_its_sweep(write_sweep, train_env, capsys):
    # a learning rate too small to move the parameters: the second run ends
    # where it started
    path = write_sweep({"name": "chain", "runs": [
        {"name": "first"},
        {"name": "second", "train.init_from": "runs/chain/first_seed0",
         "optimizer.learning_rate": 1.0e-12, "data.seq_len": 16}]})
    first, second = load_sweep(path).runs
    main(["sweep", str(path)])
    out = capsys.readouterr().out
    assert "[1/2] first_seed0: done" in out and "[2/2] second_seed0: done" in out
    params = [jax.tree.leaves(load_run(load_config(run.run_dir / "config.yaml"),
                                       run.run_dir).params) for run in (first, second)]
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-9)
