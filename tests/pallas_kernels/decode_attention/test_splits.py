"""splits.merge (flash-decoding's merge of normalised partials by their
logsumexps) against a float64 NumPy merge: random logsumexps tens apart, parts
that saw nothing (-inf, zero output), rows no part saw (zero), one part."""
import jax
import numpy as np
import pytest

from pallas_kernels.decode_attention import splits


def numpy_merge(out, lse):
    top = np.max(lse, axis=-2, keepdims=True)
    weight = np.exp(lse - np.where(np.isfinite(top), top, 0.0))
    total = weight.sum(axis=-2)
    merged = (weight[..., None] * out).sum(axis=-3)
    return merged / np.where(total == 0, 1.0, total)[..., None]


@pytest.mark.parametrize("parts", [1, 2, 7, 32])
def test_merge_matches_float64(parts):
    rng = np.random.default_rng(parts)
    shape = (2, 3, parts, 5)  # [B, Hkv, parts, R]
    lse = rng.standard_normal(shape) * 30
    lse[0, 0, :, 1] = -np.inf  # a row no part saw
    lse[1, 2, : parts // 2, 3] = -np.inf  # parts that saw nothing
    out = np.where(np.isfinite(lse)[..., None], rng.standard_normal((*shape, 16)), 0.0)
    got = np.asarray(jax.jit(splits.merge)(out.astype(np.float32), lse.astype(np.float32)))
    want = numpy_merge(out, lse)
    assert got.shape == (2, 3, 5, 16) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not got[0, 0, 1].any()
