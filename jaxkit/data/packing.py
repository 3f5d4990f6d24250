"""Documents packed into fixed-length rows by best-fit decreasing.

A document longer than a row is first cut into row-sized pieces (the last
one shorter). Pieces are placed longest first, each into the open row whose
free space is the smallest that still holds it (the earliest such row on
ties), or into a new row. Rows end in padding, never between pieces.

Each row carries segment ids beside its tokens: 1, 2, ... for its pieces in
order, 0 for padding; attention within equal ids keeps every piece to
itself."""
from __future__ import annotations

import bisect
import heapq
from typing import Sequence

import numpy as np

PAD_SEGMENT = 0


def split_long(lengths: Sequence[int], row_len: int) -> list[tuple[int, int, int]]:
    """(document, start, length) pieces of documents of `lengths`, each at
    most row_len long, in document order; empty documents give none."""
    if row_len < 1:
        raise ValueError(f"row_len must be >= 1, got {row_len}")
    return [(doc, start, min(row_len, n - start))
            for doc, n in enumerate(lengths) for start in range(0, n, row_len)]


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, in placement order) of items of `sizes`,
    each at most capacity, by best-fit decreasing: items in order of size,
    longest first (equal sizes in index order), each into the bin with the
    least room that fits it (the earliest-opened on ties), else a new bin."""
    if any(not 1 <= s <= capacity for s in sizes):
        raise ValueError(f"item sizes must lie in [1, {capacity}], got "
                         f"{[s for s in sizes if not 1 <= s <= capacity][:3]}")
    bins: list[list[int]] = []
    room_of: dict[int, list[int]] = {}  # free room -> heap of the bins that have it
    rooms: list[int] = []  # sorted free rooms that some open bin has
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[item]
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            target, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[at]
            target = heapq.heappop(room_of[room])
            if not room_of[room]:
                del room_of[room], rooms[at]
        bins[target].append(item)
        left = room - size
        if left:
            if left not in room_of:
                room_of[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(room_of[left], target)
    return bins


def pack(documents: Sequence[np.ndarray], row_len: int, pad_id: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """(tokens, segment ids), each [rows, row_len]: the documents' tokens
    packed as the module docstring describes, padding tokens pad_id with
    segment id 0. Every document token appears exactly once, each piece's
    tokens contiguous and in order."""
    pieces = split_long([d.size for d in documents], row_len)
    rows = best_fit_decreasing([n for _, _, n in pieces], row_len)
    tokens = np.full((len(rows), row_len), pad_id, np.int32)  # the encoders' id dtype
    segments = np.full((len(rows), row_len), PAD_SEGMENT, np.int32)
    for r, members in enumerate(rows):
        at = 0
        for segment, p in enumerate(members, start=PAD_SEGMENT + 1):
            doc, start, n = pieces[p]
            tokens[r, at:at + n] = documents[doc][start:start + n]
            segments[r, at:at + n] = segment
            at += n
    return tokens, segments
