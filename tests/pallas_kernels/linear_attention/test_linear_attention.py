"""Chunked gated linear attention against the token-by-token reference:
forward, final state and the gradients of q, k, v, log_decay and the
initial state in float32 at odd shapes, the Pallas kernel interpreted on CPU
and compiled on a GPU; a sequence continued from its final state."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kernel_modes

from pallas_kernels.linear_attention import linear_attention, linear_attention_reference

# ||x - ref|| / ||ref|| of outputs and gradients in float32 (observed ~5e-6:
# the chunked forms sum in another order than the recurrence).
F32_TOL = 5e-5
# bfloat16 inputs, matmul operands in bfloat16 with float32 accumulation.
BF16_TOL = 3e-2


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    length: int
    heads: int
    key_dim: int
    value_dim: int
    chunk: int
    per_key: bool = False
    initial_state: bool = True


CASES = {
    "s300_c64_dk48": Case(1, 300, 2, 48, 40, 64),
    "s37_c16_no_state": Case(2, 37, 3, 16, 24, 16, initial_state=False),
    "s64_whole_chunk": Case(1, 64, 1, 32, 32, 64),
    "per_key_s77_c32": Case(2, 77, 2, 24, 20, 32, per_key=True),
}


def inputs(case: Case, seed: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    B, S, H, Dk, Dv = case.batch, case.length, case.heads, case.key_dim, case.value_dim
    q = jax.random.normal(keys[0], (B, S, H, Dk)).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, H, Dk)).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, H, Dv)).astype(dtype)
    # GLA's gate: log-sigmoid, here sharp enough that some tokens nearly reset the state.
    gate_shape = (B, S, H, Dk) if case.per_key else (B, S, H)
    log_decay = jax.nn.log_sigmoid(2.0 * jax.random.normal(keys[3], gate_shape) + 2.0)
    state = jax.random.normal(keys[4], (B, H, Dk, Dv)) if case.initial_state else None
    cotangents = (jax.random.normal(keys[5], (B, S, H, Dv)).astype(dtype),
                  jax.random.normal(keys[4], (B, H, Dk, Dv)))
    return (q, k, v, log_decay, state), cotangents


def out_and_grads(attention, args, cotangents):
    out, pull = jax.vjp(attention, *args)
    return out, pull(cotangents)


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(case: Case, implementation: str, interpret=None, seed=0, dtype=jnp.float32, tol=F32_TOL):
    args, cotangents = inputs(case, seed, dtype)
    present = [a for a in args if a is not None]

    def with_state(fn):
        def call(*xs):
            full = list(xs) + [None] * (5 - len(xs))
            return fn(*full)
        return call

    kernel = with_state(lambda q, k, v, g, h: linear_attention(
        q, k, v, g, h, chunk_size=case.chunk, implementation=implementation, interpret=interpret))
    reference = with_state(lambda q, k, v, g, h: linear_attention_reference(
        *(x if x is None else x.astype(jnp.float32) for x in (q, k, v, g, h))))
    (out, final), grads = jax.jit(lambda a, c: out_and_grads(kernel, a, c))(present, cotangents)
    f32 = [a.astype(jnp.float32) for a in present]
    (ref_out, ref_final), ref_grads = jax.jit(
        lambda a, c: out_and_grads(reference, a, c))(f32, (cotangents[0].astype(jnp.float32),
                                                          cotangents[1]))
    assert out.shape == ref_out.shape and out.dtype == dtype and final.dtype == jnp.float32
    names = ["out", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]
    errors = dict(zip(names, [relative_error(out, ref_out), relative_error(final, ref_final),
                              *(relative_error(g, r) for g, r in zip(grads, ref_grads))]))
    assert max(errors.values()) < tol, errors


RUNS = [pytest.param("xla", None, id="xla"),
        pytest.param("blockspec", True, id="blockspec-interpret"),
        pytest.param("blockspec", False, id="blockspec-compiled", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("implementation,interpret", RUNS)
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.per_key])
def test_matches_reference(name, implementation, interpret):
    check(CASES[name], implementation, interpret, seed=len(name))


def test_per_key_decay_matches_reference():
    check(CASES["per_key_s77_c32"], "xla", seed=3)


@pytest.mark.parametrize("interpret", kernel_modes())
def test_bfloat16_kernel_matches_reference(interpret):
    check(CASES["s37_c16_no_state"], "blockspec", interpret, seed=5, dtype=jnp.bfloat16,
          tol=BF16_TOL)


@pytest.mark.parametrize("interpret", kernel_modes())
def test_continuing_from_the_final_state_equals_one_call(interpret):
    """What generation and sequence parallelism rely on: a sequence cut in
    two, the second part started from the first part's final state."""
    case = CASES["s300_c64_dk48"]
    (q, k, v, g, h0), _ = inputs(case, seed=9)
    run = jax.jit(lambda q, k, v, g, h: linear_attention(
        q, k, v, g, h, chunk_size=32, implementation="blockspec", interpret=interpret))
    whole, final = run(q, k, v, g, h0)
    cut = 131
    first, mid = run(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], h0)
    second, end = run(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], mid)
    assert relative_error(jnp.concatenate([first, second], axis=1), whole) < F32_TOL
    assert relative_error(end, final) < F32_TOL
