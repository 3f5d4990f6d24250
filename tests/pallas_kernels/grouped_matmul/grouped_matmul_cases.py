"""The one case table of grouped matmul that every implementation runs, and
the check they share.

test_grouped_matmul.py runs each case through every implementation of the
op's dispatch table (pallas_kernels.grouped_matmul.api.TABLE): the reference
('xla'), 'ragged_dot', the portable kernel ('blockspec', interpreted: it has
no GPU lowering) and the Mosaic GPU kernel ('mosaic_gpu', compiled on a
GPU), each taking the cases its table entry accepts (``problem``): the
Mosaic kernel, for one, takes 16-bit inputs only. The Mosaic kernel also
runs, by itself, in JAX's GPU interpreter on CPU, on the cases marked for it.
Cases with ``consumers=2`` run the two-consumer-warpgroup Mosaic kernels
(two_consumers.py), which only the Mosaic implementation takes.

A run checks gmm's output and its gradients (d-lhs, d-rhs through jax.vjp
with a random cotangent) and tgmm against a group-by-group float64 NumPy
computation on the same rounded inputs, by relative error
||got - want|| / ||want||: under 1e-5 for float32 inputs, under 2e-2 for
bfloat16 ones (a float32 output of bfloat16 inputs: 1e-5, their products
being exact in float32). Rows in no group and groups with no rows must come
out exactly zero. Shapes are odd: row tiles are ragged, K is padded and N
tiles are partial.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels.grouped_matmul import gmm, tgmm
from pallas_kernels.grouped_matmul.api import TABLE

F32_TOL = 1e-5
BF16_TOL = 2e-2
ROUTINGS = ("balanced", "random", "empty_groups", "rows_past_groups")
# What the Mosaic kernel runs in the GPU interpreter: gmm, the same product
# with rhs given transposed ([G, N, K]), and tgmm.
GPU_INTERPRETER_OPS = ("gmm", "gmm_transposed_rhs", "tgmm")


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    # A routing kind of ROUTINGS, or the group sizes themselves.
    routing: str | tuple[int, ...]
    dtype: object = jnp.float32
    transpose_rhs: bool = False
    out_dtype: object = None  # preferred_element_type; None: the inputs' dtype
    groups: int = 5
    blockspec_tiling: tuple[int, int, int] = (16, 16, 16)
    mosaic_tiling: tuple[int, int, int] | None = None  # None: the kernel's defaults
    consumers: int = 1  # 2: the Mosaic kernels of two_consumers.py
    pingpong: bool = False  # consumers=2: gmm items taken whole, in turn
    # Small enough for the Mosaic kernel in JAX's GPU interpreter (seconds a call).
    gpu_interpreter: bool = False

    def tiling(self, implementation):
        return {"blockspec": self.blockspec_tiling,
                "mosaic_gpu": self.mosaic_tiling}.get(implementation)

    @property
    def tolerances(self):
        """(output, gradients): the relative error each must stay under."""
        grads = F32_TOL if self.dtype == jnp.float32 else BF16_TOL
        return (F32_TOL if self.out_dtype == jnp.float32 else grads), grads

    def group_sizes(self, rng):
        """[groups] sizes summing to m, but for rows_past_groups (23 rows in no group)."""
        if not isinstance(self.routing, str):
            return np.asarray(self.routing)
        g, m = self.groups, self.m
        if self.routing == "balanced":
            sizes = np.full(g, m // g)
            sizes[-1] += m - sizes.sum()
        elif self.routing == "random":
            sizes = rng.multinomial(m, rng.dirichlet(np.full(g, 0.5)))
        elif self.routing == "empty_groups":
            sizes = np.zeros(g, int)
            sizes[::2] = rng.multinomial(m, np.full(len(sizes[::2]), 1 / len(sizes[::2])))
        else:
            sizes = rng.multinomial(m - 23, np.full(g, 1 / g))
        return sizes


BF16 = jnp.bfloat16
# Odd shapes for the Mosaic kernel's tiles too: M, K and N all misaligned
# (padded for TMA) with partial tiles, and several tiles each way.
MOSAIC_SIZED = dict(m=333, k=200, n=136, dtype=BF16, blockspec_tiling=(64, 64, 64))
GPU_INTERPRETED = dict(m=203, k=128, n=128, routing=(70, 0, 59, 40), groups=4, dtype=BF16,
                       out_dtype=jnp.float32, blockspec_tiling=(64, 64, 64),
                       mosaic_tiling=(64, 64, 64), gpu_interpreter=True)
# The two-consumer kernels at their default tilings (gmm (128, 64, 256), tgmm
# (64, 128, 256)) and at (256, 128, 64), a tiling both take (gmm: 128 rows a
# warpgroup; tgmm: 64 K rows a warpgroup); in the interpreter 128-row tiles
# with groups that end inside a warpgroup's rows, so one warpgroup of a step
# has no rows (it only frees the ring's slots), and a zero tail.
TWO_CONSUMERS = dict(consumers=2, **MOSAIC_SIZED)
TWO_CONSUMERS_INTERPRETED = dict(GPU_INTERPRETED, m=270, k=256, n=256, routing=(100, 0, 90, 50),
                                 out_dtype=BF16, mosaic_tiling=(128, 128, 128), consumers=2)
# Ping-pong: at its default tiling (128, 64, 128) and at (64, 64, 256); in the
# interpreter 64-row items so each consumer gets several, and the default
# 128-row ones, with groups ending inside items, an empty group and a zero
# tail. (The interpreter does not reproduce TMA's zero fill and clipping at
# a partial N tile: the split and ping-pong gmms at N=384 in 256-column
# tiles come out wrong there, so its cases keep N a multiple of the tile.)
PINGPONG = dict(TWO_CONSUMERS, pingpong=True)
PINGPONG_INTERPRETED = dict(TWO_CONSUMERS_INTERPRETED, mosaic_tiling=(64, 64, 128), pingpong=True)
# Odd group sizes: many items end in a one-row store, here in a partial last N
# tile (136 columns), whose bulk copy must not run on into the next row (another
# item's, stored by another block: a race that zeroed values on an H100).
ODD_GROUPS = (33, 7, 41, 1, 25, 63, 3, 57, 19, 35, 9, 27)
# transpose_rhs alternates over the routings, so both gradient layouts run.
CASES = {
    # float32: the tight tolerance (the Mosaic kernel takes 16-bit inputs only).
    "f32_balanced": Case(77, 40, 24, "balanced"),
    "f32_random_transposed": Case(77, 40, 24, "random", transpose_rhs=True),
    "f32_empty_groups": Case(77, 40, 24, "empty_groups"),
    "f32_rows_past_groups_transposed": Case(77, 40, 24, "rows_past_groups", transpose_rhs=True),
    "bf16_balanced": Case(routing="balanced", **MOSAIC_SIZED),
    "bf16_random_transposed": Case(routing="random", transpose_rhs=True, **MOSAIC_SIZED),
    "bf16_empty_groups": Case(routing="empty_groups", **MOSAIC_SIZED),
    "bf16_rows_past_groups_transposed": Case(routing="rows_past_groups", transpose_rhs=True,
                                             **MOSAIC_SIZED),
    "bf16_f32_out_transposed": Case(routing="rows_past_groups", transpose_rhs=True,
                                    out_dtype=jnp.float32, **MOSAIC_SIZED),
    # An empty group and 34 rows past the groups; N a multiple of the tile.
    "gpu_interpreted": Case(**GPU_INTERPRETED),
    "two_consumers_random": Case(routing="random", **TWO_CONSUMERS),
    "two_consumers_empty_groups_transposed": Case(routing="empty_groups", transpose_rhs=True,
                                                  **TWO_CONSUMERS),
    "two_consumers_rows_past_groups": Case(routing="rows_past_groups", **TWO_CONSUMERS),
    "two_consumers_256_rows_transposed": Case(routing="rows_past_groups", transpose_rhs=True,
                                              mosaic_tiling=(256, 128, 64), **TWO_CONSUMERS),
    "two_consumers_interpreted": Case(**TWO_CONSUMERS_INTERPRETED),
    "bf16_odd_groups": Case(routing=ODD_GROUPS, groups=len(ODD_GROUPS), **MOSAIC_SIZED),
    "two_consumers_odd_groups": Case(routing=ODD_GROUPS, groups=len(ODD_GROUPS),
                                     **TWO_CONSUMERS),
    "pingpong_random": Case(routing="random", **PINGPONG),
    "pingpong_rows_past_groups_transposed": Case(routing="rows_past_groups", transpose_rhs=True,
                                                 **PINGPONG),
    "pingpong_64_rows_empty_groups": Case(routing="empty_groups", mosaic_tiling=(64, 64, 256),
                                          **PINGPONG),
    "pingpong_interpreted": Case(**PINGPONG_INTERPRETED),
    "pingpong_default_tiling_interpreted": Case(**dict(PINGPONG_INTERPRETED, mosaic_tiling=None,
                                                       routing=(0, 130, 20, 90))),
}


def problem(case, implementation, interpret):
    """Why ``implementation`` (run with ``interpret``) cannot take the case
    (its gmm or its tgmm): its entry in the op's dispatch table says; None
    when it can."""
    supports = TABLE.supports[implementation]
    return next(filter(None, (supports(SimpleNamespace(
        dtype=jnp.dtype(case.dtype), tiling=case.tiling(implementation),
        interpret=bool(interpret), consumers=case.consumers, pingpong=case.pingpong, op=op,
        out_dtype=jnp.dtype(case.out_dtype or case.dtype)))
        for op in ("gmm", "tgmm"))), None)


def gpu_interpreter_problem(case, op):
    """Why the Mosaic kernel cannot run ``op`` (GPU_INTERPRETER_OPS) of the
    case in JAX's GPU interpreter, or None."""
    if not case.gpu_interpreter:
        return "too large for the GPU interpreter"
    if case.pingpong and op == "tgmm":
        return "ping-pong is a gmm schedule; its tgmm is the two-consumer cases'"
    if not compat.MOSAIC_GPU_INTERPRET_FULL and (op != "gmm" or case.transpose_rhs):
        return "jax 0.10's GPU interpreter runs gmm without a transposed rhs only"
    return problem(case, "mosaic_gpu", False)


@functools.lru_cache(maxsize=None)
def inputs(name):
    """lhs, rhs, group sizes and the cotangent of gmm's output, drawn by
    numpy (nothing to compile) and seeded by the case's name."""
    case = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rhs_shape = (case.groups, case.n, case.k) if case.transpose_rhs else \
        (case.groups, case.k, case.n)
    out_dtype = case.out_dtype or case.dtype
    lhs, rhs, cot = (jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
                     for shape, dtype in (((case.m, case.k), case.dtype),
                                          (rhs_shape, case.dtype),
                                          ((case.m, case.n), out_dtype)))
    return lhs, rhs, jnp.asarray(case.group_sizes(rng), jnp.int32), cot


@functools.lru_cache(maxsize=None)
def expected(name):
    """gmm's output, d-lhs and d-rhs for the cotangent, and tgmm(lhs, the
    cotangent in the inputs' dtype), group by group in float64 NumPy on the
    case's (rounded) inputs."""
    case = CASES[name]
    lhs, rhs, sizes, cot = (np.asarray(x, np.float64) for x in inputs(name))
    dout = np.asarray(jnp.asarray(cot).astype(case.dtype), np.float64)
    w = rhs.swapaxes(1, 2) if case.transpose_rhs else rhs  # [G, K, N]
    out, dlhs = np.zeros((case.m, case.n)), np.zeros((case.m, case.k))
    dw, tg = np.zeros_like(w), np.zeros_like(w)
    ends = np.cumsum(sizes.astype(int))
    for g, (lo, hi) in enumerate(zip(ends - sizes.astype(int), ends)):
        out[lo:hi] = lhs[lo:hi] @ w[g]
        dlhs[lo:hi] = cot[lo:hi] @ w[g].T
        dw[g] = lhs[lo:hi].T @ cot[lo:hi]
        tg[g] = lhs[lo:hi].T @ dout[lo:hi]
    return {"out": out, "d-lhs": dlhs, "d-rhs": dw.swapaxes(1, 2) if case.transpose_rhs else dw,
            "tgmm": tg}


def _outputs(gmm_fn, tgmm_fn, gradients, lhs, rhs, sizes, cot):
    got = {}
    if gmm_fn is not None and gradients:
        got["out"], vjp = jax.vjp(lambda a, b: gmm_fn(a, b, sizes), lhs, rhs)
        got["d-lhs"], got["d-rhs"] = vjp(cot)
    elif gmm_fn is not None:
        got["out"] = gmm_fn(lhs, rhs, sizes)
    if tgmm_fn is not None:
        got["tgmm"] = tgmm_fn(lhs, cot.astype(lhs.dtype), sizes)
    return got


def check(name, gmm_fn=None, tgmm_fn=None, *, gradients=True):
    """gmm_fn(lhs, rhs, group_sizes) (with its gradients, unless
    gradients=False) and tgmm_fn(lhs, dout, group_sizes) on a case, against
    ``expected``: relative error within the case's tolerances, outputs in the
    dtypes the op promises, rows in no group and empty groups exactly zero."""
    case = CASES[name]
    lhs, rhs, sizes, cot = inputs(name)
    got = jax.jit(functools.partial(_outputs, gmm_fn, tgmm_fn, gradients))(lhs, rhs, sizes, cot)
    want = expected(name)
    out_tol, grad_tol = case.tolerances
    dtypes = {"out": case.out_dtype or case.dtype, "d-lhs": case.dtype, "d-rhs": case.dtype,
              "tgmm": case.dtype}
    rows, empty = int(sizes.sum()), np.flatnonzero(np.asarray(sizes) == 0)
    for what, x in got.items():
        assert x.shape == want[what].shape and x.dtype == dtypes[what], what
        x = np.asarray(x, np.float64)
        assert np.isfinite(x).all(), f"{what} has non-finite values"
        err = np.linalg.norm(x - want[what]) / np.linalg.norm(want[what])
        tol = out_tol if what == "out" else grad_tol
        assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"
        # Rows in no group and groups with no rows are exactly zero (also
        # checks they were written).
        assert not (x[rows:] if what in ("out", "d-lhs") else x[empty]).any(), what


def api_gmm(name, implementation, interpret):
    """gmm through the public API with the case's settings."""
    case = CASES[name]
    return functools.partial(gmm, implementation=implementation, interpret=interpret,
                             tiling=case.tiling(implementation),
                             transpose_rhs=case.transpose_rhs,
                             preferred_element_type=case.out_dtype, consumers=case.consumers,
                             pingpong=case.pingpong)


def api_tgmm(name, implementation, interpret):
    """tgmm through the public API with the case's settings."""
    case = CASES[name]
    # A ping-pong case's tiling is its gmm's; its tgmm keeps the default (as gmm's VJP does).
    tiling = None if case.pingpong else case.tiling(implementation)
    return functools.partial(tgmm, implementation=implementation, interpret=interpret,
                             tiling=tiling, consumers=case.consumers)
