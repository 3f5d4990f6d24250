"""The Hopper (Pallas Mosaic GPU) decode kernel on the decode case table
(decode_cases.py): compiled against the float64 expectation on an sm_90 GPU
(``compiled``, marked ``gpu``); on CPU lowered for CUDA (``lower``), which
checks its layouts, TMA copies, swizzles and that its shared memory fits, and
run in JAX's Mosaic GPU interpreter (``interpreted``, two cases: 15-25 s
each), which checks its schedule, its barriers' phases and its
arithmetic against the same expectation. Cases without num_splits run the
stream-K schedule with 5 blocks, whose ranges cross (sequence, head) pairs.

Also on CPU: the arguments it refuses and why, and that the shared
implementation rule sends a call to it on a (simulated) Hopper GPU.
"""
import jax
import jax.numpy as jnp
import pytest
from case_table import case_params, refusals
from decode_cases import CASES, case_inputs, check

from pallas_kernels import compat
from pallas_kernels.decode_attention import api, mosaic_gpu
from pallas_kernels.decode_attention.kv_formats import quantize_kv

RUNS = [pytest.param("lower", id="lower"),
        pytest.param("interpreted", id="interpreted"),
        pytest.param("compiled", id="compiled", marks=pytest.mark.gpu)]
# Stream-K ranges across pairs: contiguous bf16 at T 1, paged fp8 at T 3 in a
# windowed ring. (The split schedule runs the same kernel with other bounds.)
INTERPRETED = ("bf16_gqa8", "bf16_fp8_paged_ring")
STREAM_BLOCKS = 5


def problem(case, mode):
    name = _name(case)
    if mode == "interpreted" and name not in INTERPRETED:
        return "interpreted on a few cases only"
    q, k, v, _, page_table = case_inputs(name)[0]
    return mosaic_gpu.unsupported(q, k, v, page_table, case.mosaic_block_kv)


def _name(case):
    return next(n for n, c in CASES.items() if c is case)


def test_case_table_coverage():
    """The kernel takes every 16-bit case but KIVI-2 ones (their caches hold
    whole 8-row tiles), plain, int8 and fp8, contiguous and paged, T 1 and 3."""
    refused = refusals(CASES, RUNS, problem)
    assert set(refused) == {(name, run.id) for name, case in CASES.items() for run in RUNS
                            if case.dtype == jnp.float32 or case.k_format == "kivi2"
                            or run.id == "interpreted" and name not in INTERPRETED}
    taken = [c for c in CASES.values() if c.dtype != jnp.float32 and c.k_format != "kivi2"]
    assert {c.k_format for c in taken} | {c.v_format for c in taken} >= {None, "int8", "fp8"}
    assert {bool(c.page_size) for c in taken} == {True, False}
    assert {c.num_queries for c in taken} == {1, 3}


@pytest.mark.parametrize("name,mode", case_params(CASES, RUNS, problem))
def test_kernel_matches_expectation(name, mode):
    case = CASES[name]

    schedule = (dict(num_splits=case.num_splits) if case.num_splits
                else dict(num_blocks=STREAM_BLOCKS))

    def attention(q, k, v, lengths, page_table):
        return mosaic_gpu.mosaic_decode_attention(q, k, v, lengths, page_table,
                                                  block_kv=case.mosaic_block_kv,
                                                  interpret=mode == "interpreted",
                                                  **schedule, **case.kwargs())
    if mode != "lower":
        check(name, attention)
        return
    lowered = jax.jit(attention).trace(*case_inputs(name)[0]).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @mosaic_gpu") == 1


def _call(B=1, T=1, Hq=4, Hkv=2, D=64, S=64, dtype=jnp.bfloat16):
    q = jnp.ones((B, T, Hq, D), dtype)
    k = jnp.ones((B, S, Hkv, D), dtype)
    return q, k


@pytest.mark.parametrize("change,needle", [
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(D=96), "head_dim=96"),
    (dict(T=5, Hq=16, Hkv=1), "80 query rows"),
    (dict(S=60), "S=60 must be a multiple of 8"),
])
def test_unsupported_shapes_are_named(change, needle):
    q, k = _call(**change)
    assert needle in mosaic_gpu.unsupported(q, k, k, None, None)


def test_unsupported_tiles_and_pages_are_named():
    q, k = _call()
    assert "block_kv=32" in mosaic_gpu.unsupported(q, k, k, None, 32)
    pool = jnp.ones((5, 12, 2, 64), jnp.bfloat16)
    table = jnp.zeros((1, 4), jnp.int32)
    assert "page_size=12" in mosaic_gpu.unsupported(q, pool, pool, table, None)
    assert "cache must have q's" in mosaic_gpu.unsupported(q, k.astype(jnp.float16), k, None,
                                                             None)
    assert mosaic_gpu.unsupported(q, quantize_kv(k, "int8"), quantize_kv(k, "fp8"), None,
                                  None) is None


@pytest.mark.parametrize("machine,want", [("cpu", "xla"), ("hopper", "mosaic_gpu"),
                                          ("ampere", "blockspec")])
def test_auto_picks_by_machine(monkeypatch, machine, want):
    """'auto': the reference on CPU, the Mosaic kernel on Hopper, the portable
    kernel on other GPUs and for calls the Mosaic kernel refuses."""
    monkeypatch.setattr(compat, "platform", lambda: "cpu" if machine == "cpu" else "gpu")
    monkeypatch.setattr(compat, "is_hopper", lambda: machine == "hopper")
    q, k = _call()
    args = dict(q=q, k=k, v=k, page_table=None, block_kv=None, num_splits=None,
                sliding_window=None, logit_softcap=None, scale=None)
    assert api.TABLE.resolve("auto", **args).name == want
    args.update(q=q.astype(jnp.float32), k=k.astype(jnp.float32), v=k.astype(jnp.float32))
    assert api.TABLE.resolve("auto", **args).name == ("xla" if machine == "cpu" else "blockspec")


def test_supports_names_the_device_off_hopper():
    q, k = _call()
    if compat.is_hopper():
        assert api.TABLE.resolve("mosaic_gpu", q=q, k=k, v=k, page_table=None, block_kv=None,
                                 num_splits=None, sliding_window=None, logit_softcap=None,
                                 scale=None).name == "mosaic_gpu"
    else:
        with pytest.raises(ValueError, match="needs a Hopper"):
            api.decode_attention(q, k, k, jnp.ones((1,), jnp.int32),
                                 implementation="mosaic_gpu")


def test_queries_reach_the_kernel_unpadded():
    """At T = 1 with B * Hq a multiple of 8 the kernel reads q as it is (a
    reshape): no pad or copy of the queries runs before it."""
    q, k = _call(B=2, Hq=8, Hkv=2, D=128, S=256)
    lengths = jnp.array([100, 256], jnp.int32)
    text = jax.jit(mosaic_gpu.mosaic_decode_attention).trace(q, k, k, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
    before = text[:text.index("custom_call @mosaic_gpu")]
    assert "stablehlo.pad" not in before and "transpose" not in before


@pytest.mark.parametrize("kwargs,needle", [(dict(num_blocks=0), "num_blocks must be >= 1, got 0"),
                                           (dict(num_blocks=4, num_splits=2), "give one")])
def test_schedule_arguments_are_checked(kwargs, needle):
    q, k = _call()
    with pytest.raises(ValueError, match=needle):
        mosaic_gpu.mosaic_decode_attention(q, k, k, jnp.ones((1,), jnp.int32), **kwargs)
