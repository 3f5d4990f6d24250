"""linear_attention refuses a bad argument with one line naming it, before
anything is traced or compiled."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import linear_attention

B, S, H, DK, DV = 1, 20, 2, 16, 8


def arrays(**changes):
    args = dict(q=jnp.zeros((B, S, H, DK)), k=jnp.zeros((B, S, H, DK)), v=jnp.zeros((B, S, H, DV)),
                log_decay=jnp.zeros((B, S, H)))
    return {**args, **changes}


CASES = [
    (dict(q=jnp.zeros((B, S, DK))), {}, ValueError, r"q, k, v must be \[batch"),
    (dict(k=jnp.zeros((B, S, H, 32))), {}, ValueError, r"k shape \(1, 20, 2, 32\)"),
    (dict(v=jnp.zeros((B, S + 1, H, DV))), {}, ValueError, r"v shape \(1, 21, 2, 8\)"),
    (dict(v=jnp.zeros((B, S, H, DV), jnp.bfloat16)), {}, ValueError, "dtypes differ"),
    (dict(q=jnp.zeros((B, S, H, DK), jnp.int32), k=jnp.zeros((B, S, H, DK), jnp.int32),
          v=jnp.zeros((B, S, H, DV), jnp.int32)), {}, ValueError, "unsupported dtype int32"),
    (dict(log_decay=jnp.zeros((B, S))), {}, ValueError, r"log_decay shape \(1, 20\)"),
    (dict(log_decay=jnp.zeros((B, S, H), jnp.int32)), {}, ValueError, "float dtype, got int32"),
    (dict(q=[[0.0]]), {}, TypeError, "q must be a jax or NumPy array"),
    ({}, dict(initial_state=jnp.zeros((B, H, DV, DK))), ValueError,
     r"initial_state shape \(1, 2, 8, 16\)"),
    ({}, dict(chunk_size=48), ValueError, "chunk_size must be a power of two >= 16, got 48"),
    ({}, dict(chunk_size=8), ValueError, "chunk_size must be >= 16, got 8"),
    ({}, dict(chunk_size=64.0), TypeError, "chunk_size must be an int, got 64.0"),
    ({}, dict(scale=-1.0), ValueError, "scale must be finite and > 0, got -1.0"),
    ({}, dict(implementation="cudnn"), ValueError, "unknown linear attention implementation 'cudnn'"),
    ({}, dict(implementation="xla", interpret=True), ValueError, "takes no interpret"),
    (dict(log_decay=jnp.zeros((B, S, H, DK))), dict(implementation="blockspec", interpret=True),
     ValueError, "blockspec.*per-head log_decay"),
]


@pytest.mark.parametrize("changes,kwargs,error,message", CASES)
def test_bad_argument_is_refused_in_one_line(changes, kwargs, error, message):
    a = arrays(**changes)
    with pytest.raises(error, match=message) as info:
        linear_attention(a["q"], a["k"], a["v"], a["log_decay"], **kwargs)
    assert "\n" not in str(info.value)


def test_numpy_arrays_are_taken():
    a = {name: np.asarray(x) for name, x in arrays().items()}
    out, state = linear_attention(a["q"], a["k"], a["v"], a["log_decay"], chunk_size=16,
                                  implementation="xla")
    assert out.shape == (B, S, H, DV) and state.shape == (B, H, DK, DV)
