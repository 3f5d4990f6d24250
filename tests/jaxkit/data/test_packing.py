"""Packing documents into rows: every document token appears exactly once,
rows are full but for trailing padding, and best-fit decreasing places each
piece as a direct search over the open rows does, deterministically."""
import numpy as np
import pytest

from jaxkit.data.packing import best_fit_decreasing, pack, split_long

PAD = -1


def _documents(seed: int, count: int, longest: int) -> list[np.ndarray]:
    """Documents of distinct tokens (document d holds d * 10_000 + 0, 1, ...)."""
    lengths = np.random.default_rng(seed).integers(1, longest + 1, count)
    return [d * 10_000 + np.arange(n) for d, n in enumerate(lengths)]


def _best_fit_by_search(sizes, capacity):
    """Best-fit decreasing by scanning every open bin for each item."""
    bins, room = [], []
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= sizes[item]]
        if fits:
            target = min(fits, key=lambda b: (room[b], b))
        else:
            target = len(bins)
            bins.append([])
            room.append(capacity)
        bins[target].append(item)
        room[target] -= sizes[item]
    return bins


def test_best_fit_decreasing_by_hand():
    # 6 opens a bin (room 2), 5 another (3), 4 a third (4); 3 fills the
    # second; the first 2 the first; the second 2 goes to the third (room 4,
    # the only one left); 1 to the third as well
    assert best_fit_decreasing([5, 3, 4, 2, 2, 1, 6], 8) == [[6, 3], [0, 1], [2, 4, 5]]


@pytest.mark.parametrize("seed,capacity", [(0, 8), (1, 17), (2, 64), (3, 5)])
def test_best_fit_decreasing_against_a_search(seed, capacity):
    sizes = np.random.default_rng(seed).integers(1, capacity + 1, 300).tolist()
    bins = best_fit_decreasing(sizes, capacity)
    assert bins == _best_fit_by_search(sizes, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= capacity for b in bins)
    assert best_fit_decreasing(sizes, capacity) == bins  # deterministic


def test_split_long_cuts_row_sized_pieces():
    assert split_long([3, 0, 8, 5], 4) == [(0, 0, 3), (2, 0, 4), (2, 4, 4), (3, 0, 4),
                                           (3, 4, 1)]
    with pytest.raises(ValueError, match="row_len must be >= 1"):
        split_long([3], 0)


@pytest.mark.parametrize("seed,row_len,longest", [(0, 16, 9), (1, 33, 80), (2, 7, 7)])
def test_every_token_once_and_padding_only_at_row_ends(seed, row_len, longest):
    docs = _documents(seed, 60, longest)
    tokens, segments = pack(docs, row_len, PAD)
    assert tokens.shape == segments.shape and tokens.shape[1] == row_len
    real = tokens[segments != 0]
    assert sorted(real.tolist()) == sorted(np.concatenate(docs).tolist())
    assert np.all(tokens[segments == 0] == PAD)
    for row_tokens, row_segments in zip(tokens, segments):
        used = int((row_segments != 0).sum())
        assert np.all(row_segments[:used] > 0) and np.all(row_segments[used:] == 0)
        # segments count up from 1; each piece is a run of one document, in order
        ids = row_segments[:used]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for s in range(1, ids.max() + 1):
            piece = row_tokens[:used][ids == s]
            assert len(set(piece // 10_000)) == 1 and np.all(np.diff(piece) == 1)
    # rows as full as best fit makes them: no two rows' contents would fit in
    # one (a row opens only for a piece that fits no open row, and rows only fill)
    used = np.sort((segments != 0).sum(axis=1))
    assert len(used) < 2 or used[0] + used[1] > row_len
    again = pack(docs, row_len, PAD)
    np.testing.assert_array_equal(again[0], tokens)
    np.testing.assert_array_equal(again[1], segments)


def test_pack_by_hand():
    docs = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8, 9, 10]), np.array([11, 12])]
    tokens, segments = pack(docs, 4, PAD)
    # pieces: [1 2 3], [4 5 6 7], [8 9 10], [11 12]; longest first: [4..7] a
    # row of its own, [1 2 3] and [8 9 10] a row each, [11 12] fits neither
    np.testing.assert_array_equal(tokens, [[4, 5, 6, 7], [1, 2, 3, PAD], [8, 9, 10, PAD],
                                           [11, 12, PAD, PAD]])
    np.testing.assert_array_equal(segments, [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0],
                                             [1, 1, 0, 0]])
    tokens, segments = pack([np.array([1, 2]), np.array([3]), np.array([4, 5, 6])], 6, PAD)
    np.testing.assert_array_equal(tokens, [[4, 5, 6, 1, 2, 3]])
    np.testing.assert_array_equal(segments, [[1, 1, 1, 2, 2, 3]])


def test_item_sizes_are_checked():
    with pytest.raises(ValueError, match=r"item sizes must lie in \[1, 4\], got \[5\]"):
        best_fit_decreasing([2, 5], 4)
