"""The quantised matmuls' reference ('xla') and portable kernels on the
shared case tables (quant_matmul_cases.py), interpreted on CPU and compiled
on a GPU; which cases each implementation takes; int4 packing; and the
error paths."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from case_table import refusals
from quant_matmul_cases import (MOSAIC_RUNS, PORTABLE_RUNS, TABLES, api_run, check,
                                params, problem)

from pallas_kernels.quant_matmul import (
    fp8_blockwise_matmul,
    int4_weight_only_matmul,
    pack_int4,
    unpack_int4,
    w8a8_matmul,
)
from pallas_kernels.quant_matmul.api import INT4_TABLE, TABLE
from pallas_kernels.quant_matmul.packing import unpack_nibbles_float


@pytest.mark.parametrize("op,name,implementation,interpret", params(PORTABLE_RUNS))
def test_matches_float64_product(op, name, implementation, interpret):
    check(op, name, implementation, api_run(op, name, implementation, interpret))


def test_case_tables_coverage():
    """Every implementation runs every case of the w8a8 and fp8 tables and
    some of the int4 table, where the Mosaic kernel leaves out exactly the
    cases its dispatch entry refuses (x not bfloat16, zero points), which
    through the API raise that reason."""
    runs = PORTABLE_RUNS + MOSAIC_RUNS
    assert {r.values[0] for r in runs} == set(TABLE.supports) == set(INT4_TABLE.supports)
    for op, cases in TABLES.items():
        refused = refusals(cases, runs, functools.partial(problem, op))
        for run in runs:
            assert any((name, run.id) not in refused for name in cases), (op, run.id)
        want = {(n, r.id) for n, c in cases.items() for r in MOSAIC_RUNS
                if op == "int4" and (c.dtype != jnp.bfloat16 or c.asymmetric)}
        assert set(refused) == want, op
        for (name, _), reason in refused.items():
            with pytest.raises(ValueError, match=re.escape(reason)):
                api_run(op, name, "mosaic_gpu", None)


@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trip(signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = jax.random.randint(jax.random.key(5), (38, 7), lo, hi, jnp.int32)
    packed = pack_int4(codes)
    assert packed.shape == (7, 19) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_int4(packed, signed=signed), codes)
    # layout: byte [n, i] holds k = 2i in its low nibble and k = 2i + 1 in its high one
    np.testing.assert_array_equal(np.asarray(packed) & 15, np.asarray(codes[0::2]).T & 15)
    np.testing.assert_array_equal(np.asarray(packed) >> 4, np.asarray(codes[1::2]).T & 15)
    if signed:  # the same bytes as int4 W^T, as the Mosaic GPU kernel reads them
        as_int4 = jax.lax.bitcast_convert_type(packed, jnp.int4).reshape(7, 38)
        np.testing.assert_array_equal(np.asarray(as_int4, np.int32), np.asarray(codes).T)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("signed", [True, False])
def test_unpack_nibbles_float_is_exact(dtype, signed):
    every_byte = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8).reshape(2, 128)
    lo, hi = unpack_nibbles_float(every_byte, dtype, signed=signed)
    assert lo.dtype == dtype and hi.dtype == dtype
    codes = np.asarray(unpack_int4(every_byte, signed=signed), np.float32)  # [256, 2]
    np.testing.assert_array_equal(np.asarray(lo, np.float32), codes[0::2].T)
    np.testing.assert_array_equal(np.asarray(hi, np.float32), codes[1::2].T)


def test_error_paths():
    xq, wq = jnp.ones((8, 64), jnp.int8), jnp.ones((16, 64), jnp.int8)
    xs, ws = jnp.ones((8,)), jnp.ones((16,))
    with pytest.raises(ValueError, match="xq has dtype float16"):
        w8a8_matmul(xq.astype(jnp.float16), xs, wq, ws)
    with pytest.raises(ValueError, match="shapes do not match"):
        w8a8_matmul(xq, xs, wq, ws[:15])
    with pytest.raises(ValueError, match="unknown quantized matmul implementation 'triton'"):
        w8a8_matmul(xq, xs, wq, ws, implementation="triton")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            w8a8_matmul(xq, xs, wq, ws, implementation="pallas", interpret=False)
    fx, fw = jnp.ones((8, 128), jnp.float8_e4m3fn), jnp.ones((16, 128), jnp.float8_e4m3fn)
    fxs, fws = jnp.ones((8, 1)), jnp.ones((1, 1))
    with pytest.raises(ValueError, match="wq has dtype float8_e5m2"):
        fp8_blockwise_matmul(fx, fxs, fw.astype(jnp.float8_e5m2), fws)
    with pytest.raises(ValueError, match="fp8 blockwise shapes do not match"):
        fp8_blockwise_matmul(fx, fxs[:, :0], fw, fws)
    packed, s = pack_int4(jnp.zeros((64, 16), jnp.int32)), jnp.ones((4, 16))
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="packed has dtype int8"):
        int4_weight_only_matmul(x, packed.astype(jnp.int8), s, group_size=16)
    with pytest.raises(ValueError, match="x has dtype int32"):
        int4_weight_only_matmul(x.astype(jnp.int32), packed, s, group_size=16)
    with pytest.raises(ValueError, match="group_size=24 must divide K=64"):
        int4_weight_only_matmul(x, packed, s, group_size=24)
    with pytest.raises(ValueError, match="group_size // 2=8 must be a power of two >= 16"):
        int4_weight_only_matmul(x, packed, s, group_size=16, implementation="pallas",
                                interpret=True)
    with pytest.raises(ValueError, match="even K"):
        pack_int4(jnp.ones((5, 3), jnp.int32))
    with pytest.raises(ValueError, match="takes bfloat16, float16 or float32, got int8"):
        unpack_nibbles_float(packed, jnp.int8, signed=True)
