"""row_gather against the spec computed in float64 NumPy: the output and the
gradients of src and weight, at odd shapes (M and N not multiples of a
tile, a last tile running past M, empty and negative indices), float32 and
bfloat16; the reference, and the Pallas kernel interpreted on CPU, lowered
through Pallas's Triton lowering there (what a GPU compiles) and compiled on
a GPU. Bad arguments are refused in one line before anything is traced."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.row_gather import row_gather
from pallas_kernels.row_gather.blockspec import blockspec_row_gather, layout

# ||x - want|| / ||want||. float32: sums of at most 4 products in another
# order (observed ~1e-7). bfloat16: the output and src's gradient are
# rounded to bfloat16 (2**-9 relative at most).
F32_TOL = 1e-5
BF16_TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    src_rows: int
    dim: int
    rows: int
    sources: int  # 0: a 1-D index (one source a row)
    weighted: bool
    dtype: object = jnp.float32
    out_dtype: object = None

    @property
    def tol(self):
        return F32_TOL if self.dtype == jnp.float32 else BF16_TOL


CASES = {
    "gather_n37_m29_d64": Case(37, 64, 29, 0, False),              # MoE's forward gather
    "sum3_n50_m23_d16": Case(50, 16, 23, 3, False),                # a gradient's gather-and-sum
    "combine4_n41_m19_d128_f32out": Case(41, 128, 19, 4, True, out_dtype=jnp.float32),
    "bf16_combine2_n30_m70_d256": Case(30, 256, 70, 2, True, jnp.bfloat16),  # 3 tiles of 32
}


def inputs(case: Case, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    src = jax.random.normal(k[0], (case.src_rows, case.dim)).astype(case.dtype)
    shape = (case.rows,) if case.sources == 0 else (case.rows, case.sources)
    # about a tenth empty (>= N) and a tenth negative (counted from the end)
    index = jax.random.randint(k[1], shape, -case.src_rows // 8, case.src_rows * 9 // 8)
    weight = None
    if case.weighted:
        weight = jax.random.normal(k[2], shape).astype(case.dtype)
    g = jax.random.normal(k[3], (case.rows, case.dim))
    return src, index, weight, g


def expected(src, index, weight, g):
    """(out, d_src, d_weight) in float64 from the definition."""
    s, gg = np.asarray(src, np.float64), np.asarray(g, np.float64)
    idx = np.asarray(index).reshape(index.shape[0], -1)
    n = s.shape[0]
    idx = np.where(idx < 0, idx + n, idx)
    ok = (idx >= 0) & (idx < n)
    w = np.ones(idx.shape) if weight is None else np.asarray(weight, np.float64).reshape(idx.shape)
    w = np.where(ok, w, 0.0)
    rows = s[np.where(ok, idx, 0)]  # [M, r, D]
    out = np.einsum("mr,mrd->md", w, rows)
    d_src = np.zeros_like(s)
    np.add.at(d_src, np.where(ok, idx, 0), w[..., None] * gg[:, None, :])
    d_weight = np.where(ok, np.einsum("md,mrd->mr", gg, rows), 0.0)
    return out, d_src, d_weight.reshape(index.shape)


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("blockspec", "interpret", id="interpret"),
        pytest.param("blockspec", "lower", id="lower"),
        pytest.param("blockspec", "compiled", id="compiled", marks=pytest.mark.gpu)]


def test_case_table_coverage():
    c = CASES["bf16_combine2_n30_m70_d256"]
    cfg = layout(c.rows, c.sources, c.src_rows, c.dim, c.weighted)
    assert c.rows % cfg.tile and c.rows > cfg.tile, cfg  # several tiles, the last partial
    assert {c.dtype for c in CASES.values()} == {jnp.float32, jnp.bfloat16}


@pytest.mark.parametrize("implementation,mode", RUNS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_spec(name, implementation, mode):
    case = CASES[name]
    src, index, weight, g = inputs(case, seed=len(name))
    out_dtype = case.out_dtype or case.dtype
    if mode == "lower":
        idx2 = index.reshape(index.shape[0], -1)
        w2 = None if weight is None else weight.reshape(idx2.shape)
        run = jax.jit(lambda s, w: blockspec_row_gather(s, idx2, w, out_dtype=out_dtype))
        text = run.trace(src, w2).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 1
        return
    kw = dict(implementation=implementation, out_dtype=case.out_dtype)
    if implementation != "xla":
        kw["interpret"] = mode == "interpret"

    def run(src, weight):
        out, pull = jax.vjp(lambda s, w: row_gather(s, index, w, **kw), src, weight)
        return (out, *pull(g.astype(out.dtype)))

    got = jax.jit(run)(src, weight)
    want = expected(src, index, weight, g.astype(out_dtype))
    assert got[0].shape == want[0].shape and got[0].dtype == out_dtype
    assert got[1].dtype == src.dtype
    errors = {"out": relative_error(got[0], want[0]), "d_src": relative_error(got[1], want[1])}
    if weight is not None:
        assert got[2].dtype == weight.dtype
        errors["d_weight"] = relative_error(got[2], want[2])
    assert max(errors.values()) < case.tol, errors


def _call(src=None, index=None, weight=None, **kw):
    return row_gather(jnp.ones((5, 16)) if src is None else src,
                      jnp.zeros((3, 2), jnp.int32) if index is None else index, weight, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(src=jnp.ones((5,))), ValueError, r"src must be \[N, D\].*got shape \(5,\)"),
    (dict(src=jnp.ones((5, 16), jnp.int32)), ValueError, "src must be float32.*got int32"),
    (dict(index=jnp.zeros((3, 2))), TypeError, "index must have an integer dtype, got float32"),
    (dict(index=jnp.zeros((3, 2, 1), jnp.int32)), ValueError, "index must be an int array"),
    (dict(weight=jnp.ones((3,))), ValueError, r"weight must be a float array of shape \(3, 2\)"),
    (dict(weight=jnp.ones((3, 2), jnp.int32)), ValueError, "weight must be a float array"),
    (dict(out_dtype=jnp.int8), ValueError, "out_dtype must be float32.*got int8"),
    (dict(src=[[1.0] * 16]), TypeError, "src must be a jax or NumPy array"),
    (dict(implementation="cudnn"), ValueError, "unknown row gather implementation 'cudnn'"),
    (dict(src=jnp.ones((5, 48)), implementation="blockspec", interpret=True), ValueError,
     "takes rows of a power of two from 16 to 8192 values, got 48"),
    (dict(index=jnp.zeros((0, 2), jnp.int32), implementation="blockspec", interpret=True),
     ValueError, "at least one output row"),
])
def test_bad_arguments_are_refused_in_one_line(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        _call(**kwargs)
    assert "\n" not in str(info.value)
