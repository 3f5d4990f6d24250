"""The int4 bench's chained timing (what the chain computes and what it refuses)
and its --shapes option."""
import argparse

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import bench


def test_chain_applies_every_set_in_turn_each_pass():
    x0 = jnp.arange(1.0, 5.0).reshape(1, 4)
    sets = [(None, jnp.full((4,), 2.0), jnp.full((4,), 1.0)),
            (None, jnp.full((4,), 3.0), jnp.full((4,), -1.0))]
    got = bench.chain(lambda x, a, b: x * a + b, repeats=2)(x0, sets)
    want = np.asarray(x0)
    for _ in range(2):
        for _, a, b in sets:
            want = want * np.asarray(a) + np.asarray(b)
    np.testing.assert_allclose(got, want)


def test_chained_time_refuses_an_output_not_shaped_like_x():
    sets = [(jnp.ones((2, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16))]
    with pytest.raises(ValueError, match=r"output shaped like x \(2, 8\)"):
        bench.chained_time(lambda x, w: x @ w, sets, repeats=1)


def test_chained_time_is_per_call():
    sets = [(jnp.ones((2, 8), jnp.float32), jnp.eye(8)) for _ in range(2)]
    assert 0 < bench.chained_time(lambda x, w: x @ w, sets, repeats=2) < 1.0


def test_parse_shapes():
    assert bench.parse_shapes("4096x14336,14336X4096") == ((4096, 14336), (14336, 4096))


@pytest.mark.parametrize("text, match", [
    ("4096x14336,8192", r"'8192' is not KxN"),
    ("4000x4096", r"'4000x4096': K must be a positive multiple of 128 and N of 64"),
    ("4096x100", r"'4096x100': K must be"),
])
def test_parse_shapes_refuses(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        bench.parse_shapes(text)
