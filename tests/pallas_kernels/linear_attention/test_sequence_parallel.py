"""Sequence-parallel (LASP-2) linear attention on 8 CPU devices: outputs,
final state and the gradients of every input equal one device's results:
the interpreted kernel (per-head decay) with the sequence split over 8
devices, the jnp form (per-key decay) split over 4 with the batch over 2."""
import json
import sys
from pathlib import Path

import jax
import numpy as np

from multidevice import run_worker

# ||x - one device|| / ||one device|| in float32: the same math summed in another order.
TOL = 1e-5
SCENARIOS = ("blockspec-scalar-seq8", "xla-per_key-data2_seq4")


def test_sequence_parallel_matches_one_device(tmp_path, compile_cache):
    run_worker("sequence_parallel", tmp_path, 8, compile_cache, script=__file__)
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert sorted(errors) == sorted(SCENARIOS)
    for scenario, by_output in errors.items():
        assert set(by_output) == {"out", "final_state", "dq", "dk", "dv", "dlog_decay",
                                  "dinitial_state"}, scenario
        assert max(by_output.values()) < TOL, (scenario, by_output)


def _relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def worker_sequence_parallel(out: Path):
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.linear_attention import (linear_attention,
                                                 sequence_parallel_linear_attention)
    assert jax.device_count() == 8
    jax.config.update("jax_default_matmul_precision", "highest")
    errors = {}
    for scenario in SCENARIOS:
        implementation, form, layout = scenario.split("-")
        data = 2 if layout == "data2_seq4" else 1
        mesh = jax.make_mesh((data, 8 // data), ("data", "sequence"),
                             axis_types=(AxisType.Auto,) * 2)
        B, S, H, Dk, Dv = 2, 8 * 24, 2, 16, 24
        keys = jax.random.split(jax.random.key(len(scenario)), 7)
        gate_shape = (B, S, H, Dk) if form == "per_key" else (B, S, H)
        args = (jax.random.normal(keys[0], (B, S, H, Dk)), jax.random.normal(keys[1], (B, S, H, Dk)),
                jax.random.normal(keys[2], (B, S, H, Dv)),
                jax.nn.log_sigmoid(2.0 * jax.random.normal(keys[3], gate_shape) + 2.0),
                jax.random.normal(keys[4], (B, H, Dk, Dv)))
        cotangents = (jax.random.normal(keys[5], (B, S, H, Dv)),
                      jax.random.normal(keys[6], (B, H, Dk, Dv)))
        kw = dict(chunk_size=16, implementation=implementation,
                  **({"interpret": True} if implementation == "blockspec" else {}))

        def whole(q, k, v, g, h0):
            return linear_attention(q, k, v, g, h0, **kw)

        rows = P("data", "sequence")
        sharded = jax.shard_map(
            lambda q, k, v, g, h0: sequence_parallel_linear_attention(
                q, k, v, g, h0, axis_name="sequence", **kw),
            mesh=mesh, in_specs=(rows, rows, rows, rows, P("data")),
            out_specs=(rows, P("data")), check_vma=False)

        def out_and_grads(fn):
            (o, final), pull = jax.vjp(fn, *args)
            return (o, final, *pull(cotangents))

        results = jax.jit(lambda: out_and_grads(sharded))()
        expected = jax.jit(lambda: out_and_grads(whole))()
        names = ("out", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state")
        errors[scenario] = {n: _relative_error(r, e) for n, r, e in zip(names, results, expected)}
    (out / "errors.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    globals()[f"worker_{sys.argv[1]}"](Path(sys.argv[2]))
