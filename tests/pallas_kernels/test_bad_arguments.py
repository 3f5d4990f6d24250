"""Every public kernel API refuses a bad argument with a one-line TypeError or
ValueError naming the argument and the bad value, before anything is traced or
compiled (pallas_kernels.dispatch, "Arguments"). Shapes are tiny: no case
reaches a kernel."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention
from pallas_kernels.attention.blockspec import PortableBlockSizes
from pallas_kernels.attention.tuning import BACKWARD_HEAD_DIMS, KernelBlocks, MosaicBlockSizes
from pallas_kernels.grouped_matmul import gmm, tgmm
from pallas_kernels.quant_grouped_matmul import qgmm
from pallas_kernels.quant_matmul import (fp8_blockwise_matmul, int4_weight_only_matmul,
                                         w8a8_matmul)
from pallas_kernels.quant_matmul.mosaic_gpu import Tiling


def _attention(q=None, k=None, v=None, **kw):
    ones = jnp.ones((1, 8, 2, 16), jnp.float32)
    return flash_attention(ones if q is None else q, ones if k is None else k,
                           ones if v is None else v, **kw)


def _gmm(lhs=None, rhs=None, group_sizes=None, **kw):
    return gmm(jnp.ones((8, 16)) if lhs is None else lhs,
               jnp.ones((2, 16, 8)) if rhs is None else rhs,
               jnp.array([3, 4]) if group_sizes is None else group_sizes, **kw)


def _tgmm(lhs=None, dout=None, group_sizes=None, **kw):
    return tgmm(jnp.ones((8, 16)) if lhs is None else lhs,
                jnp.ones((8, 8)) if dout is None else dout,
                jnp.array([3, 4]) if group_sizes is None else group_sizes, **kw)


def _w8a8(xq=None, xs=None, **kw):
    return w8a8_matmul(jnp.ones((4, 32), jnp.int8) if xq is None else xq,
                       jnp.ones((4,)) if xs is None else xs,
                       kw.pop("wq", jnp.ones((8, 32), jnp.int8)), jnp.ones((8,)), **kw)


def _fp8(xs=None, **kw):
    e4m3 = jnp.float8_e4m3fn
    return fp8_blockwise_matmul(jnp.ones((4, 32), e4m3), jnp.ones((4, 1)) if xs is None else xs,
                                jnp.ones((8, 32), e4m3), jnp.ones((1, 1)), **kw)


def _int4(x=None, scales=None, **kw):
    kw.setdefault("group_size", 16)
    return int4_weight_only_matmul(jnp.ones((4, 32)) if x is None else x,
                                   kw.pop("packed", jnp.ones((8, 16), jnp.uint8)),
                                   jnp.ones((2, 8)) if scales is None else scales, **kw)


def _qgmm(lhs=None, group_sizes=None, **kw):
    kw.setdefault("kind", "int8")
    kw.setdefault("group_size", 16)
    return qgmm(jnp.ones((8, 16)) if lhs is None else lhs, jnp.ones((2, 16, 8), jnp.int8),
                jnp.ones((2, 1, 8)), jnp.array([3, 4]) if group_sizes is None else group_sizes,
                **kw)


BLOCKS = KernelBlocks(64, 64, 2)
PLAN = next(iter(BACKWARD_HEAD_DIMS))
OPS = {"attention": _attention, "gmm": _gmm, "tgmm": _tgmm, "w8a8": _w8a8, "fp8": _fp8,
       "int4": _int4, "qgmm": _qgmm}
LIST_2D = [[1.0] * 16] * 8
BLOCKSPEC = dict(implementation="blockspec", interpret=True)

CASES = [
    # attention: windows, softcap, scale, flags
    ("attention", dict(sliding_window=2.5), TypeError, r"sliding_window must be an int, got 2\.5"),
    ("attention", dict(sliding_window=True), TypeError, r"sliding_window must be an int, got True"),
    ("attention", dict(sliding_window=np.float32(3)), TypeError,
     r"sliding_window must be an int, got np\.float32\(3\.0\)"),
    ("attention", dict(sliding_window=jnp.int32(3)), TypeError, r"sliding_window must be an int"),
    ("attention", dict(sliding_window="3"), TypeError, r"sliding_window must be an int, got '3'"),
    ("attention", dict(logit_softcap=float("nan")), ValueError,
     r"logit_softcap must be finite and > 0, got nan"),
    ("attention", dict(logit_softcap=True), TypeError, r"logit_softcap must be a float, got True"),
    ("attention", dict(scale=0.0), ValueError, r"scale must be finite and > 0, got 0\.0"),
    ("attention", dict(scale=float("inf")), ValueError, r"scale must be finite and > 0, got inf"),
    ("attention", dict(scale="a"), TypeError, r"scale must be a float, got 'a'"),
    ("attention", dict(causal="yes"), TypeError, r"causal must be a bool, got 'yes'"),
    ("attention", dict(implementation="blockspec", interpret="y"), TypeError,
     r"interpret must be a bool or None, got 'y'"),
    ("attention", dict(block_sizes=PortableBlockSizes(num_stages=2.5),
                       implementation="blockspec"), TypeError,
     r"block_sizes\.num_stages must be an int, got 2\.5"),
    ("attention", dict(block_sizes=MosaicBlockSizes(KernelBlocks(64.0, 64, 2), BLOCKS, BLOCKS,
                                                    backward=PLAN)), TypeError,
     r"block_sizes\.fwd\.block_q must be an int, got 64\.0"),
    ("attention", dict(block_sizes=MosaicBlockSizes(BLOCKS, BLOCKS, KernelBlocks(64, 64, 2.0),
                                                    backward=PLAN)), TypeError,
     r"block_sizes\.dkv\.stages must be an int, got 2\.0"),
    # attention: segment ids and arrays
    ("attention", dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), TypeError,
     r"segment_ids must have an integer dtype, got float32"),
    ("attention", dict(segment_ids=np.zeros((1, 8), bool)), TypeError,
     r"segment_ids must have an integer dtype, got bool"),
    ("attention", dict(segment_ids=[[0, 0, 1], [1, 1]]), TypeError,
     r"segment_ids\[0\] must be a jax or NumPy array, got list \[0, 0, 1\]"),
    ("attention", dict(segment_ids=[[0] * 8]), TypeError,
     r"segment_ids must be an int array or a pair .* got a list of 1"),
    ("attention", dict(segment_ids=(np.zeros((1, 8), np.int32),) * 3), TypeError,
     r"segment_ids must be .* got a tuple of 3"),
    ("attention", dict(segment_ids=(np.zeros((1, 8), np.int32), np.zeros((1, 8)))), TypeError,
     r"segment_ids\[1\] must have an integer dtype, got float64"),
    ("attention", dict(q=np.ones((1, 8, 2, 16)).tolist()), TypeError,
     r"q must be a jax or NumPy array, got list \[\[\[\[1\.0"),
    ("attention", dict(v=((1.0,),)), TypeError, r"v must be a jax or NumPy array, got tuple"),
    # grouped matmul: group sizes, arrays, tiling, dtypes
    ("gmm", dict(group_sizes=jnp.array([3.0, 4.0])), TypeError,
     r"group_sizes must have an integer dtype, got float32"),
    ("gmm", dict(group_sizes=np.array([True, False])), TypeError,
     r"group_sizes must have an integer dtype, got bool"),
    ("gmm", dict(group_sizes=[3, 4]), TypeError,
     r"group_sizes must be a jax or NumPy array, got list \[3, 4\]"),
    ("gmm", dict(lhs=LIST_2D), TypeError, r"lhs must be a jax or NumPy array, got list"),
    ("gmm", dict(rhs=[LIST_2D] * 2), TypeError, r"rhs must be a jax or NumPy array, got list"),
    ("gmm", dict(tiling=(2.5, 16, 16), **BLOCKSPEC), TypeError,
     r"tiling\[0\] must be an int, got 2\.5"),
    ("gmm", dict(tiling=(16.0, 16, 16), **BLOCKSPEC), TypeError,
     r"tiling\[0\] must be an int, got 16\.0"),
    ("gmm", dict(tiling=(16, True, 16), **BLOCKSPEC), TypeError,
     r"tiling\[1\] must be an int, got True"),
    ("gmm", dict(tiling=(16, 0, 16), **BLOCKSPEC), ValueError, r"tiling\[1\] must be >= 1, got 0"),
    ("gmm", dict(tiling=16, **BLOCKSPEC), TypeError,
     r"tiling must be a tuple of 3 positive ints, got 16"),
    ("gmm", dict(preferred_element_type="x"), TypeError,
     r"preferred_element_type must be a dtype, got 'x'"),
    ("tgmm", dict(group_sizes=(3.0, 4.0)), TypeError,
     r"group_sizes must be a jax or NumPy array, got tuple \(3\.0, 4\.0\)"),
    ("tgmm", dict(dout=[[1.0] * 8] * 8), TypeError, r"dout must be a jax or NumPy array"),
    ("tgmm", dict(tiling=(16, -16, 16), **BLOCKSPEC), ValueError,
     r"tiling\[1\] must be >= 1, got -16"),
    # quantised matmuls: block sizes, tiling, group size, tiles, arrays
    ("w8a8", dict(block_sizes=(2.5, 16, 16), implementation="blockspec"), TypeError,
     r"block_sizes\[0\] must be an int, got 2\.5"),
    ("w8a8", dict(block_sizes=(0, 16, 16), implementation="blockspec"), ValueError,
     r"block_sizes\[0\] must be >= 1, got 0"),
    ("w8a8", dict(block_sizes=(24, 16, 16), implementation="blockspec"), ValueError,
     r"block_sizes\[0\]=24 must be a power of two >= 16"),
    ("w8a8", dict(block_sizes=(16, 16), implementation="blockspec"), TypeError,
     r"block_sizes must be a tuple of 3 positive ints, got \(16, 16\)"),
    ("w8a8", dict(tiling=(128, 128, 3), implementation="mosaic_gpu"), TypeError,
     r"tiling must be a mosaic_gpu\.Tiling, got \(128, 128, 3\)"),
    ("w8a8", dict(tiling=Tiling(128, 128.0, 3), implementation="mosaic_gpu"), TypeError,
     r"tiling\[1\] must be an int, got 128\.0"),
    ("w8a8", dict(xq=np.ones((4, 32), np.int8).tolist()), TypeError,
     r"xq must be a jax or NumPy array, got list"),
    ("w8a8", dict(xs=[1.0] * 4), TypeError, r"xs must be a jax or NumPy array, got list"),
    ("w8a8", dict(wq=jnp.ones((8,), jnp.int8)), ValueError, r"wq must be \[N, K\], got shape \(8,\)"),
    ("w8a8", dict(out_dtype="x"), TypeError, r"out_dtype must be a dtype, got 'x'"),
    ("fp8", dict(block_sizes=(16, 16, 16), implementation="blockspec"), TypeError,
     r"block_sizes must be a tuple of 2 positive ints, got \(16, 16, 16\)"),
    ("fp8", dict(block_sizes=(16, np.float64(16)), implementation="blockspec"), TypeError,
     r"block_sizes\[1\] must be an int, got np\.float64\(16\.0\)"),
    ("fp8", dict(xs=[[1.0]] * 4), TypeError, r"xs must be a jax or NumPy array, got list"),
    ("int4", dict(group_size=16.0), TypeError, r"group_size must be an int, got 16\.0"),
    ("int4", dict(group_size=True), TypeError, r"group_size must be an int, got True"),
    ("int4", dict(group_size=0), ValueError, r"group_size must be >= 1, got 0"),
    ("int4", dict(block_n=0, implementation="blockspec"), ValueError,
     r"block_n must be >= 1, got 0"),
    ("int4", dict(block_n=2.5, implementation="blockspec"), TypeError,
     r"block_n must be an int, got 2\.5"),
    ("int4", dict(split_k=1.5, implementation="blockspec"), TypeError,
     r"split_k must be an int, got 1\.5"),
    ("int4", dict(split_k=-1, implementation="blockspec"), ValueError,
     r"split_k must be >= 1, got -1"),
    ("int4", dict(x=np.ones((4, 32)).tolist()), TypeError, r"x must be a jax or NumPy array"),
    ("int4", dict(scales=[[1.0] * 8] * 2), TypeError, r"scales must be a jax or NumPy array"),
    ("int4", dict(packed=jnp.ones((8,), jnp.uint8)), ValueError,
     r"packed must be \[N, K/2\], got shape \(8,\)"),
    # quantised grouped matmul
    ("qgmm", dict(group_size=16.0), TypeError, r"group_size must be an int, got 16\.0"),
    ("qgmm", dict(group_size=np.float32(16)), TypeError, r"group_size must be an int"),
    ("qgmm", dict(group_sizes=jnp.array([3.0, 4.0])), TypeError,
     r"group_sizes must have an integer dtype, got float32"),
    ("qgmm", dict(group_sizes=[3, 4]), TypeError, r"group_sizes must be a jax or NumPy array"),
    ("qgmm", dict(lhs=LIST_2D), TypeError, r"lhs must be a jax or NumPy array, got list"),
    ("qgmm", dict(tiling=(16.0, 16, 16), implementation="blockspec"), TypeError,
     r"tiling\[0\] must be an int, got 16\.0"),
    ("qgmm", dict(tiling=(16, 16), implementation="blockspec"), TypeError,
     r"tiling must be a tuple of 3 positive ints, got \(16, 16\)"),
    ("qgmm", dict(preferred_element_type="x"), TypeError,
     r"preferred_element_type must be a dtype, got 'x'"),
]


@pytest.mark.parametrize("op, kwargs, error, match", CASES,
                         ids=[f"{op}-{'-'.join(kw)}-{i}"
                              for i, (op, kw, _, _) in enumerate(CASES)])
def test_bad_argument_raises_one_line(op, kwargs, error, match):
    with pytest.raises(error, match=match) as err:
        OPS[op](**kwargs)
    assert "\n" not in str(err.value)
