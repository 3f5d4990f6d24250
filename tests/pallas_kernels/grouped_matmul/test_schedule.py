"""The persistent kernels' work deal (schedule.snake_index, snake_count): every
item goes to exactly one block, and items sorted by decreasing work even out
the blocks' sums."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul.schedule import snake_count, snake_index


@pytest.mark.parametrize("items,blocks", [(1, 4), (7, 4), (8, 4), (9, 4), (640, 132), (1280, 132)])
def test_snake_deal_gives_every_item_to_one_block(items, blocks):
    dealt = []
    for block in range(blocks):
        count = int(snake_count(items, jnp.int32(block), blocks))
        dealt += [int(snake_index(jnp.int32(i), jnp.int32(block), blocks)) for i in range(count)]
    assert sorted(dealt) == list(range(items))


def test_snake_deal_evens_out_sorted_work():
    """Items sorted by decreasing work: the busiest block's sum is within 10%
    of the mean at moe_1b's tgmm shapes, where dealing every blocks-th item
    is not."""
    rng = np.random.default_rng(0)
    blocks, per_group = 132, 40  # 32 groups x (8 K tiles x 5 N tiles)
    tiles = np.ceil(rng.multinomial(196608, rng.dirichlet(np.full(32, 20.0))) / 64)
    work = np.repeat(np.sort(tiles)[::-1], per_group)
    rounds = -(-len(work) // blocks)
    sums = np.zeros(blocks)
    for i in range(rounds):
        for b in range(blocks):
            idx = int(snake_index(np.int32(i), np.int32(b), blocks))
            if idx < len(work):
                sums[b] += work[idx]
    strided = np.bincount(np.arange(len(work)) % blocks, np.repeat(tiles, per_group))
    assert sums.max() / sums.mean() < 1.1 < strided.max() / strided.mean()
