"""Paged KV caches on the host side: the allocator of a pool's pages and the
page table of a batch of sequences of different lengths (vLLM's and
FlashInfer's layout: fixed-size pages, one pool per layer, one table for
all layers)."""
from __future__ import annotations

import dataclasses

import numpy as np


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a sequence asks for."""


class PageAllocator:
    """Hands out page ids of a pool of num_pages pages and takes them back."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPages(f"asked for {count} pages, {len(self._free)} of {self.num_pages} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclasses.dataclass(frozen=True)
class PageTable:
    """A batch's pages: table [B, pages_per_seq] int32 (entries a sequence
    never reaches point at page 0 and are never read), and each sequence's
    pages, in order."""
    table: np.ndarray
    pages: list[list[int]]


def assign_pages(allocator: PageAllocator, cached_tokens: list[int], capacity: int,
                 page_size: int) -> PageTable:
    """Pages for sequences that will hold cached_tokens[b] tokens each, in a
    ring of `capacity` slots (a multiple of page_size): a sequence longer
    than the ring needs only the ring's pages."""
    if capacity % page_size:
        raise ValueError(f"capacity {capacity} is not a multiple of page_size {page_size}")
    table = np.zeros((len(cached_tokens), capacity // page_size), np.int32)
    pages = []
    for row, tokens in zip(table, cached_tokens):
        own = allocator.allocate(pages_for(min(tokens, capacity), page_size))
        row[:len(own)] = own
        pages.append(own)
    return PageTable(table, pages)
