"""The block-selection policies (jaxkit.layers.sparse_attention.policies):
valid lists (sorted, distinct, causal, counts <= max_blocks) at odd shapes,
window_sinks against a hand-built mask, infllm_v2 dense below its threshold
and its top-k against a brute-force NumPy ranking, proxy's budgets (the group
total, the demand-proportional split) and no gradient through the selection.
Float32, reference attention; tolerances 1e-5 relative (the same math in
another order)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.layers.sparse_attention import infllm_v2, proxy, window_sinks
from jaxkit.layers.sparse_attention.blocks import Layout
from jaxkit.layers.sparse_attention.policies import PROXY_HEAD_CAP, apportion
from pallas_kernels.attention import attention_reference
from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference)
from pallas_kernels.block_sparse_attention.reference import token_mask

BS = 16


def qk(S=200, Hq=4, Hkv=2, D=16, T=None, seed=0, B=2):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    T = S if T is None else T
    return (jax.random.normal(kq, (B, S, Hq, D)), jax.random.normal(kk, (B, T, Hkv, D)),
            jax.random.normal(kv, (B, T, Hkv, D)))


POLICIES = {
    "window_sinks": lambda q, k: window_sinks(q, k, block_size=BS, window=40, sinks=20),
    "infllm_v2_max": lambda q, k: infllm_v2(q, k, block_size=BS, top_k_blocks=6, window=20,
                                            sinks=16),
    "infllm_v2_mean": lambda q, k: infllm_v2(q, k, block_size=BS, top_k_blocks=4, window=1,
                                             sinks=0, group_score="mean"),
    "proxy": lambda q, k: proxy(q, k, block_size=BS, top_k_blocks=5, window=16, sinks=16),
    "proxy_one_head": lambda q, k: proxy(q, k, block_size=BS, top_k_blocks=3, window=16,
                                         sinks=0, proxy_heads=1, coverage=0.5),
}


def last_causal(S, T):
    return (np.minimum((np.arange(-(-S // BS)) + 1) * BS, S) - 1 + T - S) // BS


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("S,T", [(200, 200), (72, 200)])
def test_lists_are_sorted_distinct_causal(name, S, T):
    q, k, _ = qk(S=S, T=T)
    indices, counts = jax.jit(POLICIES[name])(q, k)
    indices, counts = np.asarray(indices), np.asarray(counts)
    nQ, nK, M = -(-S // BS), -(-T // BS), indices.shape[-1]
    assert indices.shape[:3] == (2, 4 if name.startswith("proxy") else 2, nQ)
    assert counts.shape == indices.shape[:3] and indices.dtype == counts.dtype == np.int32
    last = last_causal(S, T)
    assert (counts >= 1).all() and (counts <= M).all()
    for (b, h, i), n in np.ndenumerate(counts):
        row = indices[b, h, i, :n]
        assert (np.diff(row) > 0).all(), (b, h, i, row)
        assert row[0] >= 0 and row[-1] <= last[i] < nK, (b, h, i, row)
        assert last[i] in row  # the diagonal block: no query row is left without a key


def hand_mask(S, window, sinks):
    """bool [S, S]: key t visible from query s (blocks of BS) by the
    window_sinks rule, written out position by position."""
    mask = np.zeros((S, S), bool)
    w, s_blocks = -(-window // BS), -(-sinks // BS)
    for s in range(S):
        i_last = min((s // BS + 1) * BS, S) - 1  # the block's last row
        for t in range(s + 1):
            j = t // BS
            mask[s, t] = j < s_blocks or j > i_last // BS - w
    return mask


@pytest.mark.parametrize("window,sinks", [(40, 20), (16, 0), (1, 33), (500, 0)])
def test_window_sinks_is_the_hand_built_mask(window, sinks):
    S = 150
    q, k, _ = qk(S=S, B=1)
    indices, counts = window_sinks(q, k, block_size=BS, window=window, sinks=sinks)
    got = token_mask(indices, counts, q_len=S, kv_len=S, heads=4, block_q=BS, block_k=BS,
                     causal=True)
    want = hand_mask(S, window, sinks)
    assert got.shape == (1, 4, S, S)
    np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(want, got.shape))


def test_infllm_v2_is_dense_at_and_below_the_threshold():
    q, k, v = qk(S=150)
    indices, counts = infllm_v2(q, k, block_size=BS, top_k_blocks=2, window=16, sinks=16,
                                dense_below=150)
    np.testing.assert_array_equal(np.asarray(counts[0, 0]), last_causal(150, 150) + 1)
    out = block_sparse_attention(q, k, v, indices, counts, block_q=BS, block_k=BS, causal=True,
                                 implementation="xla")
    want = attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    _, sparse_counts = infllm_v2(q, k, block_size=BS, top_k_blocks=2, window=16, sinks=16,
                                 dense_below=149)
    assert int(sparse_counts.max()) == 2


def numpy_top_k(q, k, *, top_k, window, sinks, group_score):
    """The infllm_v2 rule, brute force: sets of kept blocks [B, Hkv, nQ]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, S, Hq, D = q.shape
    Hkv, n = k.shape[2], -(-S // BS)
    qb = np.stack([q[:, i * BS:(i + 1) * BS].mean(1) for i in range(n)], 1)
    kb = np.stack([k[:, j * BS:(j + 1) * BS].mean(1) for j in range(n)], 1)
    sets = {}
    for b in range(B):
        for h in range(Hkv):
            heads = range(h * Hq // Hkv, (h + 1) * Hq // Hkv)
            for i in range(n):
                forced = {j for j in range(i + 1)
                          if j < -(-sinks // BS) or j > i - -(-window // BS)}
                scores = {j: getattr(np, group_score)([qb[b, i, g] @ kb[b, j, h] for g in heads])
                          for j in range(i + 1) if j not in forced}
                rest = sorted(scores, key=scores.get, reverse=True)
                sets[b, h, i] = forced | set(rest[:max(0, min(top_k, i + 1) - len(forced))])
    return sets


@pytest.mark.parametrize("group_score", ["max", "mean"])
def test_infllm_v2_keeps_the_true_top_k_blocks(group_score):
    q, k, _ = qk(S=176)
    kw = dict(top_k_blocks=5, window=17, sinks=16)
    indices, counts = infllm_v2(q, k, block_size=BS, group_score=group_score, **kw)
    want = numpy_top_k(q, k, top_k=5, window=17, sinks=16, group_score=group_score)
    for (b, h, i), kept in want.items():
        n = int(counts[b, h, i])
        assert set(np.asarray(indices[b, h, i, :n]).tolist()) == kept, (b, h, i)


def test_infllm_v2_finds_planted_blocks():
    """Query block 9's mean points along u; so do key blocks 2 and 5 only."""
    D, S = 16, 160
    q, k, _ = qk(S=S, Hq=2, Hkv=1, D=D, B=1)
    q, k = 0.05 * q, 0.05 * k
    u = jnp.zeros(D).at[3].set(4.0)
    q = q.at[:, 9 * BS:10 * BS, :].add(u)
    for j in (2, 5):
        k = k.at[:, j * BS:(j + 1) * BS].add(u)
    indices, counts = infllm_v2(q, k, block_size=BS, top_k_blocks=4, window=1, sinks=16)
    assert int(counts[0, 0, 9]) == 4
    assert np.asarray(indices[0, 0, 9, :4]).tolist() == [0, 2, 5, 9]


def test_apportion_is_sainte_lague():
    demand = jnp.asarray([[3, 1], [1, 1], [2, 6]]).T[None]  # [1, G=2, nQ=3]
    counts = apportion(demand, total=jnp.asarray([8, 8, 4]), floor=jnp.asarray([1, 1, 1]),
                       cap=jnp.asarray([8, 4, 3]), slots=8)
    # 3:1 -> 6:2; equal -> 4:4 (the cap); 2:6 with cap 3 -> 1:3
    np.testing.assert_array_equal(np.asarray(counts[0]), [[6, 4, 1], [2, 4, 3]])


def test_proxy_budgets_sum_to_the_group_budget():
    S, top_k = 200, 4
    q, k, _ = qk(S=S, Hq=6, Hkv=2, seed=3)
    q = q * jnp.asarray([0.1, 1.0, 3.0, 0.0, 2.0, 0.5])[:, None]  # unlike heads
    indices, counts = proxy(q, k, block_size=BS, top_k_blocks=top_k, window=16, sinks=16)
    counts = np.asarray(counts).reshape(2, 2, 3, -1)  # [B, Hkv, G, nQ]
    cap = np.minimum(min(PROXY_HEAD_CAP * top_k, -(-S // BS)), last_causal(S, S) + 1)
    np.testing.assert_array_equal(counts.sum(2), np.broadcast_to(3 * np.minimum(top_k, cap),
                                                                 counts.shape[:2] + cap.shape))
    assert (counts <= cap).all() and (counts[..., 1:] >= 2).all()  # window and sink blocks
    # a group's heads keep prefixes of one ranking: the lists nest
    lists = np.asarray(indices).reshape(2, 2, 3, *indices.shape[2:])
    for (b, h, g, i), n in np.ndenumerate(counts):
        for g2 in range(3):
            if counts[b, h, g2, i] >= n:
                assert set(lists[b, h, g, i, :n]) <= set(lists[b, h, g2, i, :counts[b, h, g2, i]])


def test_proxy_gives_the_spread_head_more_than_the_concentrated_one():
    """Head 0's pooled query points at key block 3 alone (its softmax mass
    sits there); head 1's query is zero (uniform mass over the causal
    blocks). Both heads rank by head 0 (proxy_heads=1)."""
    D, S = 16, 256
    q, k, _ = qk(S=S, Hq=2, Hkv=1, D=D, B=1, seed=1)
    q, k = 0.01 * q, 0.01 * k
    u = jnp.zeros(D).at[0].set(8.0)
    q = q.at[:, :, 0].add(u).at[:, :, 1].set(0.0)
    k = k.at[:, 3 * BS:4 * BS].add(u)
    indices, counts = proxy(q, k, block_size=BS, top_k_blocks=4, window=16, sinks=0,
                            coverage=0.9, proxy_heads=1)
    counts = np.asarray(counts[0])
    late = slice(10, None)  # query blocks with more causal blocks than the budget
    # demands 2 (the diagonal block and block 3 hold its mass) and 8 (the cap
    # 2 x 4; 90% of a uniform mass needs more): 8 blocks split 2:8 -> 2:6
    assert (counts[0, late] == 2).all()
    assert (counts[1, late] == 6).all()
    assert all(3 in np.asarray(indices[0, 0, i, :2]) for i in range(10, 16))


def test_selection_adds_no_gradient():
    """The gradient through policy + attention equals that of the attention
    with the same lists held fixed."""
    q, k, v = qk(S=96, B=1)
    w = jax.random.normal(jax.random.key(7), q.shape)
    policy = POLICIES["proxy"]
    fixed = policy(q, k)

    def through_policy(q, k, v):
        out = block_sparse_attention_reference(q, k, v, *policy(q, k), block_q=BS, block_k=BS,
                                               causal=True)
        return jnp.sum(out * w)

    def fixed_lists(q, k, v):
        out = block_sparse_attention_reference(q, k, v, *fixed, block_q=BS, block_k=BS,
                                               causal=True)
        return jnp.sum(out * w)
    got = jax.grad(through_policy, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(fixed_lists, argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    assert all(float(jnp.abs(g).max()) > 0 for g in got)


@pytest.mark.parametrize("call,match", [
    (lambda q, k: infllm_v2(q, k, block_size=BS, top_k_blocks=2, window=20, sinks=1),
     "top_k_blocks \\(2\\) must cover the 3"),
    (lambda q, k: proxy(q, k, block_size=BS, top_k_blocks=4, window=1, sinks=0, proxy_heads=3),
     "proxy_heads must lie in \\[0, 2\\]"),
    (lambda q, k: proxy(q, k, block_size=BS, top_k_blocks=4, window=1, sinks=0, coverage=0.0),
     "coverage must lie in \\(0, 1\\]"),
    (lambda q, k: window_sinks(q, k, block_size=BS, window=0, sinks=0), "window must be >= 1"),
    (lambda q, k: window_sinks(q[:, :, :3], k, block_size=BS, window=1, sinks=0),
     "Hkv dividing Hq"),
])
def test_bad_arguments_raise_one_line(call, match):
    q, k, _ = qk(S=64)
    with pytest.raises(ValueError, match=match) as e:
        call(q, k)
    assert "\n" not in str(e.value)


def test_layout_refuses_longer_queries_than_keys():
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        Layout(10, 5, BS)
