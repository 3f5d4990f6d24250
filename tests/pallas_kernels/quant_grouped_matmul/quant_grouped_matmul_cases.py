"""The one case table of the quantised-weight grouped matmul (qgmm) that
every implementation runs, and the check they share.

test_quant_grouped_matmul.py runs each case through the reference ('xla')
and the portable kernel ('blockspec': interpreted on CPU, compiled on a
GPU), each taking the cases its entry in the op's dispatch table
(pallas_kernels.quant_grouped_matmul.api.TABLE) accepts: the kernel, for
one, needs a power-of-two K step dividing the scale group. A run compares
the output and the gradients in lhs and in the scales (through jax.vjp with
a random cotangent) with a row-by-row, group-by-group float64 NumPy loop
straight from the layout definitions, on the same rounded inputs, by
relative error ||got - want|| / ||want||: the output under 1e-5 (it is
float32; the kernel scales per-group partial sums, the reference the
dequantised weights, so only the summation order differs), the gradients
under 1e-4 (d-scales sum M * group_size products), or under 2e-2 for a
bfloat16 lhs (whose gradient the kernel's backward computes in bfloat16).
Rows past the groups and the scales of empty groups must get exact zeros.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_grouped_matmul import pack_int4_groups, qgmm
from pallas_kernels.quant_grouped_matmul.api import TABLE

# (implementation, interpret)
RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("blockspec", True, id="blockspec-interpret"),
        pytest.param("blockspec", False, id="blockspec-compiled", marks=pytest.mark.gpu)]


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # 'int8', 'fp8' or 'int4'
    m: int
    k: int
    n: int
    sizes: tuple[int, ...]  # rows per group
    group_size: int
    asymmetric: bool = False  # int4 only: unsigned codes with zero points
    dtype: object = jnp.float32  # lhs's
    tiling: tuple[int, int, int] | None = None  # the kernel's; None: the tuned default

    @property
    def tolerances(self):
        """(output, gradients): the relative error each must stay under."""
        return 1e-5, (1e-4 if self.dtype == jnp.float32 else 2e-2)


CASES = {
    "int8_per_channel": Case("int8", 77, 96, 40, (10, 0, 30, 17, 5), 96, tiling=(16, 32, 32)),
    "int8_gs32": Case("int8", 50, 64, 72, (3, 21, 0, 26), 32, tiling=(16, 64, 64)),
    "int8_gs64": Case("int8", 53, 64, 40, (12, 0, 29, 4), 64, tiling=(16, 32, 32)),
    # bfloat16 codes convert exactly and their products are exact in float32.
    "int8_bf16_lhs_default_tiling": Case("int8", 40, 64, 32, (15, 0, 20), 32,
                                         dtype=jnp.bfloat16),
    "fp8_gs32": Case("fp8", 61, 96, 48, (0, 33, 12, 0, 9), 32, tiling=(32, 32, 16)),
    "fp8_one_group_default_tiling": Case("fp8", 40, 64, 24, (40,), 64),
    "int4_per_channel": Case("int4", 45, 128, 40, (7, 0, 25, 2), 128, tiling=(16, 64, 32)),
    "int4_zero_points": Case("int4", 70, 64, 56, (20, 19, 0, 22), 32, asymmetric=True,
                             tiling=(16, 32, 32)),
    # No power-of-two K step >= 32 divides a group of 16: the reference only.
    "int4_gs16": Case("int4", 30, 64, 24, (10, 0, 12), 16),
}


def problem(case, implementation, interpret):
    """Why ``implementation`` cannot take the case: its entry in the op's
    dispatch table says; None when it can."""
    return TABLE.supports[implementation](SimpleNamespace(
        kind=case.kind, group_size=case.group_size,
        tiling=case.tiling if implementation == "blockspec" else None,
        interpret=bool(interpret)))


@functools.lru_cache(maxsize=None)
def inputs(name):
    """lhs, codes, scales, group sizes, zeros (None but for asymmetric int4)
    and the cotangent of the output, drawn by numpy (nothing to compile) and
    seeded by the case's name; outputs come out O(10)."""
    case = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    g, groups = len(case.sizes), case.k // case.group_size
    lhs = jnp.asarray(rng.standard_normal((case.m, case.k), np.float32)).astype(case.dtype)
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (g, groups, case.n)).astype(np.float32) / 64)
    zeros = None
    if case.kind == "int8":
        codes = jnp.asarray(rng.integers(-127, 128, (g, case.k, case.n)).astype(np.int8))
    elif case.kind == "fp8":
        codes = jnp.asarray((rng.standard_normal((g, case.k, case.n), np.float32) * 60)
                            .astype(jnp.float8_e4m3fn))
    else:
        lo, hi = (0, 16) if case.asymmetric else (-8, 8)
        codes = pack_int4_groups(jnp.asarray(rng.integers(lo, hi, (g, case.k, case.n)),
                                             jnp.int32))
        if case.asymmetric:
            zeros = jnp.asarray(rng.integers(0, 16, (g, groups, case.n)).astype(np.float32))
    cot = jnp.asarray(rng.standard_normal((case.m, case.n), np.float32))
    return lhs, codes, scales, jnp.asarray(case.sizes, jnp.int32), zeros, cot


def _codes_f64(case, codes, zeros):
    """q [G, K, N]: the codes less zero points, from the layout definitions."""
    if case.kind == "int4":  # byte [g, n, i] holds k = 2i (low nibble) and 2i + 1 (high)
        b = np.asarray(codes).astype(np.int64)
        nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:2], -1)  # [G, N, K]
        if zeros is None:
            nib = np.where(nib > 7, nib - 16, nib)
        q = nib.transpose(0, 2, 1).astype(np.float64)
    else:
        q = np.asarray(codes.astype(jnp.float32), np.float64)
    if zeros is not None:
        q = q - np.repeat(np.asarray(zeros, np.float64), case.group_size, axis=1)
    return q


@functools.lru_cache(maxsize=None)
def expected(name):
    """The output, d-lhs and d-scales, row by row and group by group."""
    case = CASES[name]
    lhs, codes, scales, sizes, zeros, cot = inputs(name)
    q = _codes_f64(case, codes, zeros)
    lhs, scales, cot = (np.asarray(x, np.float64) for x in (lhs, scales, cot))
    out, dlhs = np.zeros((case.m, case.n)), np.zeros((case.m, case.k))
    dscales = np.zeros_like(scales)
    row = 0
    for e, size in enumerate(case.sizes):
        w = np.stack([q[e, kk] * scales[e, kk // case.group_size] for kk in range(case.k)])
        for r in range(row, row + size):
            out[r] = lhs[r] @ w
            dlhs[r] = cot[r] @ w.T
            for kk in range(case.k):
                dscales[e, kk // case.group_size] += q[e, kk] * lhs[r, kk] * cot[r]
        row += size
    return out, dlhs, dscales


def _out_and_grads(f, lhs, scales, cot):
    out, vjp = jax.vjp(f, lhs, scales)
    return (out, *vjp(cot))


def check(name, implementation, interpret):
    """qgmm with the implementation, its output and gradients in lhs and the
    scales, against ``expected``."""
    case = CASES[name]
    lhs, codes, scales, sizes, zeros, cot = inputs(name)

    def f(lhs, scales):
        return qgmm(lhs, codes, scales, sizes, kind=case.kind, group_size=case.group_size,
                    zeros=zeros, implementation=implementation, interpret=interpret,
                    tiling=case.tiling if implementation == "blockspec" else None)
    got = jax.jit(functools.partial(_out_and_grads, f))(lhs, scales, cot)
    out_tol, grad_tol = case.tolerances
    for what, x, want, dtype, tol in zip(("out", "d-lhs", "d-scales"), got, expected(name),
                                         (jnp.float32, case.dtype, jnp.float32),
                                         (out_tol, grad_tol, grad_tol)):
        assert x.shape == want.shape and x.dtype == dtype, what
        x = np.asarray(x, np.float64)
        assert np.isfinite(x).all(), f"{what} has non-finite values"
        err = np.linalg.norm(x - want) / np.linalg.norm(want)
        assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"
    rows = sum(case.sizes)
    assert not np.asarray(got[0][rows:]).any() and not np.asarray(got[1][rows:]).any()
    for e in np.flatnonzero(np.asarray(case.sizes) == 0):
        assert not np.asarray(got[2][e]).any()
