"""The case tables of the quantised matmuls (w8a8, fp8 blockwise, int4
weight-only) that every implementation runs, and the check they share.

test_quant_matmul.py runs each table through the reference ('xla') and the
portable kernels ('blockspec': interpreted on CPU, compiled on a GPU);
test_quant_matmul_mosaic.py through the Mosaic GPU kernels ('mosaic_gpu':
compiled on a Hopper GPU, and on CPU lowered for CUDA, which checks their
operand types, layouts and shared-memory transforms without running them).
Each implementation takes the cases its entry in the op's dispatch table
(pallas_kernels.quant_matmul.api.TABLE, INT4_TABLE) accepts: the Mosaic
int4 kernel, for one, takes bfloat16 x with symmetric codes only. Each is
given its own tuning (the portable kernels' block sizes, the Mosaic
kernels' tiling and options).

A run compares the output with a float64 NumPy product of the dequantised
operands (and, for int4, the gradient in x for a random cotangent) by
relative error ||got - want|| / ||want||, within ``tolerance``. Shapes leave
partial M, N and K tiles.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from case_table import case_params

from pallas_kernels.quant_matmul import (fp8_blockwise_matmul, int4_mosaic_gpu,
                                         int4_weight_only_matmul, mosaic_gpu, pack_int4,
                                         w8a8_matmul)
from pallas_kernels.quant_matmul.api import INT4_TABLE, TABLE
from pallas_kernels.quant_matmul.mosaic_gpu import Tiling

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
FP8_BLOCK = 128

# (implementation, mode): mode is interpret for the API's implementations,
# and 'lower' (for CUDA, on CPU) or 'compiled' for the Mosaic kernels.
PORTABLE_RUNS = [pytest.param("xla", None, id="xla"),
                 pytest.param("blockspec", True, id="blockspec-interpret"),
                 pytest.param("blockspec", False, id="blockspec-compiled",
                              marks=pytest.mark.gpu)]
MOSAIC_RUNS = [pytest.param("mosaic_gpu", "lower", id="mosaic_gpu-lower"),
               pytest.param("mosaic_gpu", "compiled", id="mosaic_gpu-compiled",
                            marks=pytest.mark.gpu)]


@dataclasses.dataclass(frozen=True)
class ScaledCase:
    """A w8a8 or fp8 blockwise matmul: x [*rows, K] @ w [N, K]^T."""
    rows: tuple[int, ...]  # x's leading dims (flattened into M)
    k: int
    n: int
    out_dtype: object
    block_sizes: tuple | None = None  # the portable kernel's; None: its defaults
    tiling: Tiling | None = None      # the Mosaic kernel's; None: its default


@dataclasses.dataclass(frozen=True)
class Int4Case:
    """x [m, K] @ int4 weights [K, N] in groups of group_size rows."""
    m: int
    k: int
    n: int
    group_size: int
    dtype: object = BF16
    asymmetric: bool = False  # unsigned codes with zero points
    block_n: int | None = None  # the portable kernel's tiling; None: its defaults
    split_k: int | None = None
    mosaic: dict = dataclasses.field(default_factory=dict)  # the Mosaic kernel's options


W8A8 = {
    "partial_tiles_f32": ScaledCase((37,), 200, 72, F32, block_sizes=(32, 32, 64)),
    "one_block_f32": ScaledCase((16,), 64, 16, F32, block_sizes=(32, 32, 64)),
    "batched_rows_bf16": ScaledCase((2, 9), 96, 40, BF16),
    # None: the Mosaic kernel's default tiling, 128x128 at this size.
    "default_tiling_f32": ScaledCase((333,), 200, 136, F32),
    "wide_tile_bf16": ScaledCase((77,), 1100, 520, BF16, tiling=Tiling(128, 256, 3)),
    # 187 tiles > 132 SMs: blocks walk several tiles, the ring crosses tiles.
    "more_tiles_than_sms": ScaledCase((2100,), 384, 1300, BF16, tiling=Tiling(128, 128, 3, 4)),
    "tall_tile_f32": ScaledCase((520,), 256, 264, F32, tiling=Tiling(256, 128, 2)),
}
FP8 = {
    "partial_tiles_f32": ScaledCase((37,), 300, 200, F32, block_sizes=(16, 64)),
    "aligned_f32": ScaledCase((16,), 256, 64, F32, block_sizes=(16, 64)),
    "default_tiling_f32": ScaledCase((333,), 300, 200, F32),
    "more_tiles_than_sms": ScaledCase((2100,), 520, 1300, BF16, tiling=Tiling(128, 128, 4, 3)),
    # A 256-wide tile spans two 128-row weight-scale blocks: the second one
    # out of N, partly out of N, and out of N on the last tile only.
    "second_scale_block_out_of_n": ScaledCase((64,), 128, 128, BF16, tiling=Tiling(128, 256, 3)),
    "second_scale_block_partly_out": ScaledCase((333,), 300, 200, BF16,
                                                tiling=Tiling(128, 256, 3)),
    "last_tile_second_block_out": ScaledCase((2100,), 520, 1300, BF16,
                                             tiling=Tiling(128, 256, 2, 4)),
}
INT4 = {
    # The portable kernel's K splits, zero points and x dtypes (the Mosaic
    # kernel takes none of these).
    "gemv_f32_split_k": Int4Case(1, 256, 72, 32, F32, block_n=32, split_k=2),
    "zero_points_f32_split_k": Int4Case(5, 256, 72, 32, F32, asymmetric=True, block_n=32,
                                        split_k=4),
    "f16": Int4Case(3, 256, 72, 32, F16, block_n=32, split_k=1),
    "zero_points_bf16": Int4Case(7, 256, 72, 32, asymmetric=True, block_n=32, split_k=1),
    "prefill_rows_f32_split_k": Int4Case(150, 256, 72, 32, F32, block_n=32, split_k=2),  # 3 row blocks
    # The Mosaic decode kernel's steps, warpgroups, stages and clusters, in
    # one block per N slice (split_k=1) or at its default K split (2 or 3
    # blocks a cluster at these sizes).
    "gemv": Int4Case(1, 1024, 384, 128),
    "step_256_codes": Int4Case(3, 768, 320, 128),  # 768 % 512 != 0
    "four_groups_a_step": Int4Case(5, 512, 256, 64, mosaic=dict(block_n=256, block_k=256)),
    "three_stages": Int4Case(16, 2048, 1152, 128, mosaic=dict(block_k=128, stages=3,
                                                              split_k=1)),
    "ragged_rows": Int4Case(37, 768, 640, 128),  # x padded to whole 8-row blocks
    "one_step_per_warpgroup": Int4Case(64, 768, 192, 128, mosaic=dict(compute_wgs=3,
                                                                      split_k=1)),
    "two_steps_a_group": Int4Case(8, 512, 192, 128, mosaic=dict(block_n=64, block_k=64,
                                                                split_k=1)),
    "eight_groups_a_step": Int4Case(4, 2048, 128, 128, mosaic=dict(block_k=1024, stages=2,
                                                                   split_k=1)),
    "warpgroup_0_takes_two": Int4Case(2, 1536, 384, 128, mosaic=dict(stages=4, split_k=1)),
    "five_stages": Int4Case(11, 1024, 192, 64, mosaic=dict(compute_wgs=3, block_k=128,
                                                           stages=5, split_k=1)),
    "five_steps_two_warpgroups": Int4Case(9, 2560, 256, 128,
                                          mosaic=dict(compute_wgs=2, block_n=128)),
    # x multicast to the blocks of a cluster (with the default K split of 2
    # blocks, a 2 x 2 cluster).
    "cluster_three_warpgroups": Int4Case(3, 1024, 512, 128, mosaic=dict(cluster=2,
                                                                        compute_wgs=3)),
    "cluster_three_stages": Int4Case(16, 1536, 256, 128,
                                     mosaic=dict(cluster=2, block_k=256, stages=3, split_k=1)),
    # K split over a cluster of blocks that sum in block 0's shared memory.
    "split_two_ragged_rows": Int4Case(37, 2048, 320, 128, mosaic=dict(split_k=2)),
    "split_seven_one_step_each": Int4Case(5, 3584, 128, 128, mosaic=dict(split_k=7)),
    "split_four_two_warpgroups": Int4Case(9, 2048, 192, 64, mosaic=dict(
        split_k=4, block_k=128, compute_wgs=2)),
    "split_steps_inside_a_group": Int4Case(3, 1024, 128, 256, mosaic=dict(split_k=4,
                                                                          block_k=128)),
    "split_two_batch_64": Int4Case(64, 1024, 128, 128, mosaic=dict(split_k=2)),
    "split_two_cluster_two": Int4Case(16, 2048, 256, 128, mosaic=dict(split_k=2, cluster=2)),
}
TABLES = {"w8a8": W8A8, "fp8": FP8, "int4": INT4}


def problem(op, case, implementation, mode):
    """Why ``implementation`` cannot take a case of ``op``: its entry in the
    op's dispatch table says, given the tuning it is run with; None when it
    can."""
    interpret = mode is True
    if op == "int4":
        groups = jax.ShapeDtypeStruct((case.k // case.group_size, case.n), jnp.float32)
        args = dict(x=jax.ShapeDtypeStruct((case.m, case.k), case.dtype),
                    packed=jax.ShapeDtypeStruct((case.n, case.k // 2), jnp.uint8),
                    zeros=groups if case.asymmetric else None, group_size=case.group_size,
                    **_int4_tiles(case, implementation))
        return INT4_TABLE.supports[implementation](SimpleNamespace(**args, interpret=interpret))
    return TABLE.supports[implementation](SimpleNamespace(
        **_scaled_tuning(case, implementation), interpret=interpret))


def params(runs):
    """pytest params (op, case name, implementation, mode) of every table."""
    return [pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks)
            for op, cases in TABLES.items()
            for p in case_params(cases, runs, functools.partial(problem, op))]


def _scaled_tuning(case, implementation):
    return dict(block_sizes=case.block_sizes if implementation == "blockspec" else None,
                tiling=case.tiling if implementation == "mosaic_gpu" else None)


def _int4_tiles(case, implementation):
    if implementation == "blockspec":
        return dict(block_n=case.block_n, split_k=case.split_k)
    return dict(block_n=None, split_k=None)


# ---------------------------------------------------------------- operands

def _rng(op, name):
    return np.random.default_rng(zlib.crc32(f"{op}/{name}".encode()))


@functools.lru_cache(maxsize=None)
def scaled_operands(op, name):
    """xq, xs, wq, ws of a w8a8 or fp8 case, drawn by numpy (nothing to
    compile): int8 codes or e4m3 values of magnitude up to about 200, scales
    in [0.01, 0.1]."""
    case, rng = TABLES[op][name], _rng(op, name)
    m, n = math.prod(case.rows), case.n
    if op == "w8a8":
        xq, wq = (rng.integers(-127, 128, shape).astype(np.int8) for shape in
                  ((m, case.k), (n, case.k)))
        xs_shape, ws_shape = (m,), (n,)
    else:
        xq, wq = ((rng.standard_normal(shape, np.float32) * 60).astype(jnp.float8_e4m3fn)
                  for shape in ((m, case.k), (n, case.k)))
        nk, nn = -(-case.k // FP8_BLOCK), -(-n // FP8_BLOCK)
        xs_shape, ws_shape = (m, nk), (nn, nk)
    xs, ws = (rng.uniform(0.01, 0.1, shape).astype(np.float32) for shape in (xs_shape, ws_shape))
    return (jnp.asarray(xq.reshape(*case.rows, case.k)),
            jnp.asarray(xs.reshape(*case.rows, *xs_shape[1:])), jnp.asarray(wq), jnp.asarray(ws))


@functools.lru_cache(maxsize=None)
def int4_operands(name):
    """x, packed codes, scales, zeros (None for symmetric codes) and the
    cotangent of an int4 case, and the float64 weights they encode [K, N]."""
    case, rng = INT4[name], _rng("int4", name)
    lo, hi = (0, 16) if case.asymmetric else (-8, 8)
    codes = rng.integers(lo, hi, (case.k, case.n))
    groups = case.k // case.group_size
    scales = rng.uniform(0.001, 0.01, (groups, case.n)).astype(np.float32)
    zeros = rng.integers(0, 16, (groups, case.n)).astype(np.float32) if case.asymmetric \
        else None
    x, cot = (jnp.asarray(rng.standard_normal(shape, np.float32)).astype(case.dtype)
              for shape in ((case.m, case.k), (case.m, case.n)))
    per_row = lambda a: np.repeat(np.asarray(a, np.float64), case.group_size, axis=0)  # noqa: E731
    w = (codes - (0 if zeros is None else per_row(zeros))) * per_row(scales)
    operands = (x, pack_int4(jnp.asarray(codes, jnp.int32)), jnp.asarray(scales),
                None if zeros is None else jnp.asarray(zeros), cot)
    return operands, w


def expected_scaled(op, name):
    """The float64 product of the dequantised operands, [*rows, N]."""
    case = TABLES[op][name]
    xq, xs, wq, ws = (np.asarray(a, np.float64) for a in scaled_operands(op, name))
    if op == "w8a8":
        return (xq @ wq.T) * xs[..., None] * ws
    x = xq * np.repeat(xs, FP8_BLOCK, axis=-1)[..., :case.k]
    w = wq * np.repeat(np.repeat(ws, FP8_BLOCK, 0), FP8_BLOCK, 1)[:case.n, :case.k]
    return x @ w.T


# ---------------------------------------------------------------- runs

def tolerance(op, case, implementation):
    """The relative error a run must stay under: int8 products accumulate
    exactly in int32, so only the scale multiplies and the output rounding
    count; Hopper's fp8 wgmma adds a block's 128 products in a
    reduced-precision (about 14-bit) accumulator before the promotion (about
    1e-4 measured on H100); int4 weights dequantise exactly in float32, and
    the Mosaic kernel rounds them to bfloat16 for its tensor-core product."""
    if op == "int4":
        return {F32: 1e-5, F16: 2e-3, BF16: 1e-2}[case.dtype]
    if case.out_dtype != F32:
        return 5e-3
    if op == "fp8":
        return 5e-4 if implementation == "mosaic_gpu" else 1e-5
    return 1e-6


def relative_error(got, want):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def api_run(op, name, implementation, interpret):
    """The case through the public API, jitted: its output (and for int4 the
    gradient in x for the case's cotangent)."""
    case = TABLES[op][name]
    if op == "int4":
        (x, packed, scales, zeros, cot), _ = int4_operands(name)
        matmul = functools.partial(int4_weight_only_matmul, group_size=case.group_size,
                                   implementation=implementation, interpret=interpret,
                                   **_int4_tiles(case, implementation))

        def out_and_dx(x, packed, scales, zeros, cot):
            out, vjp = jax.vjp(lambda x: matmul(x, packed, scales, zeros), x)
            return out, vjp(cot)[0]
        return jax.jit(out_and_dx)(x, packed, scales, zeros, cot)
    matmul = w8a8_matmul if op == "w8a8" else fp8_blockwise_matmul
    return (jax.jit(functools.partial(matmul, out_dtype=case.out_dtype,
                                      implementation=implementation, interpret=interpret,
                                      **_scaled_tuning(case, implementation)))(
        *scaled_operands(op, name)),)


def mosaic_kernel(op, name):
    """(the Mosaic GPU kernel of op with the case's settings, giving the
    output in the API's shape; its operands)."""
    case = TABLES[op][name]
    if op == "int4":
        (x, packed, scales, _, _), _ = int4_operands(name)
        return functools.partial(int4_mosaic_gpu.int4_weight_only_mosaic,
                                 group_size=case.group_size, **case.mosaic), (x, packed, scales)
    xq, xs, wq, ws = scaled_operands(op, name)
    m = math.prod(case.rows)
    kernel = mosaic_gpu.w8a8_mosaic if op == "w8a8" else mosaic_gpu.fp8_blockwise_mosaic

    def run(xq, xs, wq, ws):  # the kernels take x as [M, K]
        out = kernel(xq, xs, wq, ws, out_dtype=case.out_dtype, tiling=case.tiling)
        return out.reshape(*case.rows, case.n)
    return run, (xq.reshape(m, case.k), xs.reshape(m, *xs.shape[len(case.rows):]), wq, ws)


def check(op, name, implementation, got):
    """A run's output (and int4's gradient in x) against the float64 product."""
    case = TABLES[op][name]
    tol = tolerance(op, case, implementation)
    if op == "int4":
        (x, _, _, _, cot), w = int4_operands(name)
        want = [np.asarray(x, np.float64) @ w, np.asarray(cot, np.float64) @ w.T]
        dtype = case.dtype
    else:
        want, dtype = [expected_scaled(op, name)], case.out_dtype
    for what, g, ref in zip(("out", "dx"), got, want):
        assert g.shape == ref.shape and g.dtype == dtype, (what, g.shape, g.dtype)
        err = relative_error(g, ref)
        assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"
