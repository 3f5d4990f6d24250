"""rms_norm and add_rms_norm refuse a bad argument with one line naming it,
before anything is traced or compiled; an implementation that cannot take
a call says why."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import add_rms_norm, rms_norm

D = 16


def _rms(x=None, scale=None, **kw):
    kw.setdefault("eps", 1e-6)
    return rms_norm(jnp.ones((3, D)) if x is None else x,
                    jnp.ones((D,)) if scale is None else scale, **kw)


def _add(delta=None, **kw):
    return add_rms_norm(jnp.ones((3, D)), jnp.ones((3, D)) if delta is None else delta,
                        jnp.ones((D,)), eps=1e-6, **kw)


CASES = [
    (_rms, dict(scale=jnp.ones((D + 1,))), ValueError, r"scale shape \(17,\) must be \[D\] = \(16,\)"),
    (_rms, dict(scale=jnp.ones((1, D))), ValueError, r"scale shape \(1, 16\)"),
    (_rms, dict(x=jnp.ones(())), ValueError, r"x must be \[\.\.\., D\] with D >= 1, got shape \(\)"),
    (_rms, dict(x=jnp.ones((3, 0)), scale=jnp.ones((0,))), ValueError, r"got shape \(3, 0\)"),
    (_rms, dict(x=jnp.ones((3, D), jnp.int32)), ValueError,
     "x must be float32, bfloat16 or float16, got int32"),
    (_rms, dict(scale=jnp.ones((D,), jnp.int8)), ValueError, "scale must be float32.*got int8"),
    (_rms, dict(x=[[1.0] * D]), TypeError, "x must be a jax or NumPy array"),
    (_rms, dict(eps=0.0), ValueError, "eps must be finite and > 0, got 0.0"),
    (_rms, dict(eps=-1e-6), ValueError, "eps must be finite and > 0, got -1e-06"),
    (_rms, dict(eps=float("nan")), ValueError, "eps must be finite and > 0, got nan"),
    (_rms, dict(eps="1e-6"), TypeError, "eps must be a float, got '1e-6'"),
    (_rms, dict(implementation="cudnn"), ValueError, "unknown rms norm implementation 'cudnn'"),
    (_rms, dict(implementation="xla", interpret=True), ValueError, "takes no interpret"),
    (_rms, dict(implementation="auto", interpret=True), ValueError, "not to 'auto'"),
    (_rms, dict(implementation="blockspec", interpret=False), ValueError,
     "'blockspec' cannot run this rms norm: compiled needs a GPU"),
    (_rms, dict(x=jnp.ones((2, 16384)), scale=jnp.ones((16384,)), implementation="pallas"),
     ValueError, "blockspec: takes a last dimension of at most 8192, got 16384"),
    (_rms, dict(x=jnp.ones((0, D)), implementation="pallas"), ValueError,
     r"takes at least one row, got x of shape \(0, 16\)"),
    (_add, dict(delta=jnp.ones((3, D + 1))), ValueError,
     r"delta shape \(3, 17\) must equal x shape \(3, 16\)"),
    (_add, dict(delta=jnp.ones((3, D), jnp.bfloat16)), ValueError,
     "delta dtype bfloat16 must equal x dtype float32"),
    (_add, dict(delta=np.ones((3, D), np.int32)), ValueError, "delta dtype int32"),
]


@pytest.mark.parametrize("call,kwargs,error,message", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_is_refused_in_one_line(call, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        call(**kwargs)
    assert "\n" not in str(info.value)


def test_numpy_arrays_are_taken():
    x = np.ones((2, 3, D), np.float32)
    total, y = add_rms_norm(x, x, np.full((D,), 2.0, np.float32), eps=1e-6, implementation="xla")
    np.testing.assert_allclose(total, 2 * x)
    np.testing.assert_allclose(y, 2 * x, rtol=1e-5)
    np.testing.assert_allclose(rms_norm(x, np.ones((D,), np.float32), eps=1e-6), x, rtol=1e-5)
