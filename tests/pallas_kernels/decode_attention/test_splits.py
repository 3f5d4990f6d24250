"""splits.merge (flash-decoding's merge of normalised partials by their
logsumexps) against a float64 NumPy merge: random logsumexps tens apart, parts
that saw nothing (-inf, zero output), rows no part saw (zero), one part, parts
never written (NaN, masked by ``valid``). splits.Schedule: every tile walked
once, fragments where the kernel writes them."""
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


def test_merge_leaves_out_parts_never_written():
    rng = np.random.default_rng(0)
    out = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    lse = rng.standard_normal((2, 4, 3)).astype(np.float32)
    valid = np.array([[True, True, False, False], [True, False, True, False]])
    out[~valid], lse[~valid] = np.nan, np.inf  # memory no block wrote
    got = np.asarray(jax.jit(splits.merge)(out, lse, valid))
    want = np.stack([numpy_merge(out[i][valid[i]], lse[i][valid[i]]) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _fragments_by_walking(schedule):
    """{(pair, fragment): block} from walking each block's range tile by tile."""
    written = {}
    for block in range(schedule.blocks):
        lo, hi = schedule.bounds[block], schedule.bounds[block + 1]
        pairs = sorted({t // schedule.tiles for t in range(lo, hi)})
        for f, pair in enumerate(pairs):
            k = schedule.first_fragment[block] if f == 0 else 0
            assert (pair, k) not in written
            written[pair, k] = block
    return written


@pytest.mark.parametrize("make,args", [
    (splits.Schedule.balanced, (6, 2, 5)),      # ranges cross pairs
    (splits.Schedule.balanced, (512, 64, 132)),  # batch 64 at 4k slots: 248-tile ranges
    (splits.Schedule.balanced, (8, 64, 132)),    # batch 1: pairs cut into 16-17 fragments
    (splits.Schedule.balanced, (3, 1, 132)),     # fewer tiles than blocks
    (splits.Schedule.splits, (3, 5, 2)),
    (splits.Schedule.splits, (4, 64, 16)),
    (splits.Schedule.splits, (2, 3, 8)),         # more splits than tiles
])
def test_schedule_walks_every_tile_once(make, args):
    schedule = make(*args)
    pairs, tiles = args[:2]
    bounds = np.asarray(schedule.bounds)
    assert bounds[0] == 0 and bounds[-1] == pairs * tiles and (np.diff(bounds) > 0).all()
    if make == splits.Schedule.balanced:
        assert np.ptp(np.diff(bounds)) <= 1 and schedule.blocks == min(args[2], pairs * tiles)
    else:  # no range crosses a pair
        assert ((bounds[:-1] // tiles) == ((bounds[1:] - 1) // tiles)).all()
    written = _fragments_by_walking(schedule)
    want = {(i, k) for i in range(pairs) for k in range(schedule.fragments[i])}
    assert set(written) == want == {tuple(x) for x in np.argwhere(schedule.valid)}
    for (pair, k), block in written.items():  # a pair's fragments: consecutive blocks
        assert block == schedule.first_block[pair] + k
