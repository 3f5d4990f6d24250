"""rms_norm and add_rms_norm against the spec computed in float64 NumPy:
outputs and the gradients of x, delta and scale at odd shapes (D not a
power of two, rows ending inside a tile and inside a backward program's
walk, a 3-D input), float32 and bfloat16; the reference, and the Pallas
kernel interpreted on CPU, lowered through Pallas's Triton lowering there
(what a GPU compiles) and compiled on a GPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.dispatch import Choice
from pallas_kernels.rms_norm import add_rms_norm, rms_norm
from pallas_kernels.rms_norm.api import TABLE
from pallas_kernels.rms_norm.blockspec import (blockspec_add_rms_norm, blockspec_rms_norm,
                                               layout)

EPS = 1e-6
# ||x - want|| / ||want|| of every output and gradient. float32: observed
# ~1e-7 (float32 rounding, sums in another order).
F32_TOL = 1e-5
# bfloat16 inputs: outputs and input gradients are rounded to bfloat16
# (2**-9 relative at most; observed ~2e-3 for the norm of the error).
BF16_TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: object = jnp.float32

    @property
    def rows(self):
        return int(np.prod(self.shape[:-1]))

    @property
    def tol(self):
        return F32_TOL if self.dtype == jnp.float32 else BF16_TOL


CASES = {
    "rows37_d96": Case((37, 96)),  # a tile of 32 rows and a partial one; D padded to 128
    # 1100 rows: a backward program walks two tiles of 4 rows, and the last
    # program's second tile lies wholly past the end
    "b2_s550_d1000": Case((2, 550, 1000)),
    "rows64_d256": Case((64, 256)),  # every block whole: no masks
    "bf16_b3_s7_d1000": Case((3, 7, 1000), jnp.bfloat16),
    "bf16_rows5_d8192": Case((5, 8192), jnp.bfloat16),  # the widest row: one row a tile
}

# (implementation, mode): the reference on the default device; the kernel
# interpreted on CPU, lowered for CUDA on CPU (what a GPU compiles) and
# compiled on a GPU.
RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("blockspec", "interpret", id="interpret"),
        pytest.param("blockspec", "lower", id="lower"),
        pytest.param("blockspec", "compiled", id="compiled", marks=pytest.mark.gpu)]


def inputs(case: Case, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x, delta, dsum, dy = (jax.random.normal(k, case.shape).astype(case.dtype) for k in keys[:4])
    scale = 1.0 + 0.5 * jax.random.normal(keys[4], case.shape[-1:])
    return (x, delta, scale), (dsum, dy)


def both_ops(rms, add):
    """(x, delta, scale, dsum, dy) -> the outputs and input gradients of
    rms(x, scale) and add(x, delta, scale) -> (sum, y)."""
    def run(x, delta, scale, dsum, dy):
        y, pull = jax.vjp(rms, x, scale)
        fused, pull_fused = jax.vjp(add, x, delta, scale)
        return (y, *pull(dy)), (*fused, *pull_fused((dsum, dy)))
    return run


def expected(x, delta, scale, dsum, dy):
    """both_ops' results in float64 from the formulas (the sum rounded to
    x's dtype first, as the spec forms it)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    s, ds, dy_ = f64(scale), f64(dsum), f64(dy)

    def norm(x):
        x = f64(x)
        rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
        x_hat = x * rstd
        g = dy_ * s
        dx = rstd * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
        dscale = np.sum((dy_ * x_hat).reshape(-1, s.size), axis=0)
        return x_hat * s, dx, dscale

    y, dx, dscale = norm(x)
    total = x + delta  # in x's dtype
    y2, dx2, dscale2 = norm(total)
    return (y, dx, dscale), (f64(total), y2, dx2 + ds, dx2 + ds, dscale2)


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_case_table_coverage():
    c = CASES["b2_s550_d1000"]
    cfg = layout(c.rows, c.shape[-1], EPS, interpret=True)
    block = cfg.tile * cfg.steps
    assert cfg.steps >= 2 and 0 < c.rows % block <= block - cfg.tile, cfg
    assert {c.dtype for c in CASES.values()} == {jnp.float32, jnp.bfloat16}
    assert any(len(c.shape) == 3 for c in CASES.values())


@pytest.mark.parametrize("implementation,mode", RUNS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_spec(name, implementation, mode):
    case = CASES[name]
    (x, delta, scale), (dsum, dy) = inputs(case, seed=len(name))
    args = (x, delta, scale, dsum, dy)
    if mode == "lower":  # forward and backward of each op: four Triton kernels
        run = jax.jit(both_ops(lambda x, s: blockspec_rms_norm(x, s, eps=EPS),
                               lambda x, d, s: blockspec_add_rms_norm(x, d, s, eps=EPS)))
        text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 4
        return
    kw = dict(eps=EPS, implementation=implementation)
    if implementation != "xla":
        kw["interpret"] = mode == "interpret"
    got = jax.jit(both_ops(lambda x, s: rms_norm(x, s, **kw),
                           lambda x, d, s: add_rms_norm(x, d, s, **kw)))(*args)
    names = (("y", "dx", "dscale"), ("sum", "y", "dx", "ddelta", "dscale"))
    dtypes = ((x.dtype, x.dtype, scale.dtype), (x.dtype,) * 4 + (scale.dtype,))
    for op, g_op, w_op, op_names, op_dtypes in zip(("rms_norm", "add_rms_norm"), got,
                                                   expected(*args), names, dtypes):
        assert [(g.shape, g.dtype) for g in g_op] == [(w.shape, d) for w, d in
                                                      zip(w_op, op_dtypes)], op
        errors = {n: relative_error(g, w) for n, g, w in zip(op_names, g_op, w_op)}
        assert max(errors.values()) < case.tol, (op, errors)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_auto_picks_the_reference_until_the_bench_shows_the_kernel_faster(platform,
                                                                          monkeypatch):
    monkeypatch.setattr(compat, "platform", lambda: platform)
    x = jnp.zeros((4, 1024), jnp.bfloat16)
    assert TABLE.resolve("auto", x=x) == Choice("xla", False)
    assert TABLE.resolve("pallas", x=x) == Choice("blockspec", platform != "gpu")
