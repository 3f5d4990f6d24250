"""Tests of the Hopper (Pallas Mosaic GPU) flash-attention kernels.

The kernels run the shared case table (attention_cases.py) where their
argument checks accept a case (16-bit inputs, head_dim 64, 128 or 256),
compiled only on an sm_90 GPU (``compiled`` cases, marked ``gpu``). They
cannot run under Mosaic GPU interpret mode (``InterpretGPUParams``) in jax
0.10.2: its wgmma reads both operands from shared memory as plain arrays, so
the transposed operand views (``transpose_ref``, needed for Q K^T, dO V^T and
K Q^T) fail with "'TransposeTransform' object has no attribute 'indices'",
and a register (not shared-memory) left operand, used for P V, is not
supported. On CPU the same cases are instead lowered for CUDA (``lower``),
which checks layouts, swizzles and shared-memory transforms of every kernel
and that the case's backward plan runs the kernels it should.

On CPU this module also tests the block ranges that decide which tiles each
kernel visits and masks (against the mask itself), and that unsupported
arguments are reported and refused.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import CASES, Case, check, inputs, out_and_grads, problem
from case_table import case_params, refusals

from pallas_kernels import compat
from pallas_kernels.attention import autotune, mosaic_gpu, tuning
from pallas_kernels.attention.mask import visible
from pallas_kernels.attention.mosaic_gpu import backward_queries, common, schedule, vjp

# ---------------------------------------------------------------------------
# Block ranges (pure functions, CPU).


def _pairs(S, T, causal, window):
    q_pos = np.arange(S)[:, None] + (T - S)
    k_pos = np.arange(T)[None, :]
    return np.asarray(visible(q_pos, k_pos, causal=causal, sliding_window=window))


RANGE_CASES = [(S, T, causal, window)
               for S, T in [(200, 200), (130, 330), (330, 130), (64, 64), (1, 257)]
               for causal, window in [(False, None), (True, None), (True, 70), (False, 45), (True, 1)]]


@pytest.mark.parametrize("S,T,causal,window", RANGE_CASES)
def test_kv_block_range_covers_exactly_the_visible_blocks(S, T, causal, window):
    rows, block = 128, 64
    vis = _pairs(S, T, causal, window)
    n_blocks = -(-T // block)
    for r0 in range(0, S + rows - 1, rows):
        lo, flo, fhi, hi = (int(x) for x in schedule.kv_block_range(
            jnp.int32(r0), rows, offset=T - S, q_len=S, kv_len=T, block_kv=block,
            causal=causal, window=window))
        real = vis[r0:r0 + rows]  # padded rows (r >= S) are sliced off: not checked
        tile = np.zeros((real.shape[0], n_blocks * block), bool)
        tile[:, :T] = real
        blocks = tile.reshape(real.shape[0], n_blocks, block)
        any_vis = blocks.any(axis=(0, 2))
        assert 0 <= lo <= flo <= fhi <= hi <= n_blocks
        # Every block holding a visible pair is inside [lo, hi).
        assert not any_vis[:lo].any() and not any_vis[hi:].any()
        # Blocks treated as unmasked really are fully visible (for real rows).
        for j in range(flo, fhi):
            assert blocks[:, j].all(), (r0, j)


@pytest.mark.parametrize("S,T,causal,window", RANGE_CASES)
def test_q_block_range_covers_exactly_the_visible_blocks(S, T, causal, window):
    cols, block = 128, 64
    vis = _pairs(S, T, causal, window)
    n_blocks = -(-S // block)
    for c0 in range(0, T + cols - 1, cols):
        lo, flo, fhi, hi = (int(x) for x in schedule.q_block_range(
            jnp.int32(c0), cols, offset=T - S, q_len=S, kv_len=T, block_q=block,
            causal=causal, window=window))
        tile = np.zeros((n_blocks * block, cols), bool)
        real = vis[:, c0:c0 + cols]
        tile[:S, :real.shape[1]] = real
        blocks = tile.reshape(n_blocks, block, cols)
        any_vis = blocks.any(axis=(1, 2))
        assert 0 <= lo <= flo <= fhi <= hi <= n_blocks
        assert not any_vis[:lo].any() and not any_vis[hi:].any()
        for i in range(flo, fhi):
            # Unmasked: every real key of the tile visible to every real row;
            # and the tile has no padded key.
            assert real.shape[1] == cols and blocks[i, :max(0, min(block, S - i * block))].all()


@pytest.mark.parametrize("pairs,tiles", [(64, 32), (16, 128), (48, 5), (7, 3), (1, 300), (128, 1)])
def test_block_order_visits_every_tile_once_in_groups_that_fill_the_gpu(pairs, tiles):
    grid, names = schedule.block_order(pairs, tiles)
    assert names == ("group", "tile", "pair") and grid[1] == tiles
    group = grid[2]
    assert grid[0] * group == pairs
    assert group * tiles >= schedule.WAVE_BLOCKS or group == pairs
    # Smaller groups would not fill the GPU once.
    assert all(g * tiles < schedule.WAVE_BLOCKS for g in range(1, group) if pairs % g == 0)
    heads = 4 if pairs % 4 == 0 else 1

    # block_position under named axes of the grid's sizes: one (batch, head,
    # tile step) per block, all of them.
    def position(_):
        return jnp.stack(schedule.block_position(heads, grid))
    for name, size in zip(reversed(names), reversed(grid)):
        position = jax.vmap(position, in_axes=None, axis_name=name, axis_size=size)
    seen = np.asarray(position(jnp.zeros(()))).reshape(-1, 3)
    want = {(p // heads, p % heads, t) for p in range(pairs) for t in range(tiles)}
    assert len(seen) == len(want) and set(map(tuple, seen.tolist())) == want
    # Blocks start in grid order (the last axis fastest): a group's pairs all
    # take tile step 0 before any takes step 1.
    steps = seen[:, 2].reshape(grid[0], tiles * group)
    assert (np.diff(steps, axis=1) >= 0).all()


@pytest.mark.parametrize("pairs,tiles,causal", [(64, 32, True), (16, 128, True), (7, 3, False),
                                                 (1, 300, True), (300, 2, False)])
def test_persistent_schedule_runs_every_tile_once_balanced(pairs, tiles, causal):
    steps = tuple(t + 1 if causal else 5 for t in range(tiles))
    n_sms = 132
    table = schedule.persistent_schedule(pairs, tiles, steps, n_sms)
    assert table.shape[0] == min(n_sms, pairs * tiles)
    counts = table[:, 0]
    codes = np.concatenate([row[1:1 + n] for row, n in zip(table, counts)])
    assert sorted(codes.tolist()) == list(range(pairs * tiles))
    # Estimated work per block: within one of the longest tiles of each other.
    work = [sum(steps[c % tiles] + schedule.TILE_COST for c in row[1:1 + n])
            for row, n in zip(table, counts)]
    assert max(work) - min(work) <= max(steps) + schedule.TILE_COST
    # A block runs its tiles in block_order's group order.
    group = schedule.block_order(pairs, tiles)[0][2]
    for row, n in zip(table, counts):
        assert (np.diff(row[1:1 + n] // tiles // group) >= 0).all()


@pytest.mark.parametrize("sorted_ids", [True, False])
@pytest.mark.parametrize("S,T,tile", [(200, 200, 40), (130, 330, 10), (64, 256, 64)])
def test_segment_spans_cover_every_same_segment_pair(S, T, tile, sorted_ids):
    """Each tile's key span holds every key sharing a segment with one of its
    rows; with sorted ids (packed sequences) it is exactly the span of those
    keys (empty when there are none), so the kernels skip the rest."""
    rng = np.random.default_rng(S * T + tile + sorted_ids)
    q_ids = rng.integers(0, 5, (2, S))
    kv_ids = rng.integers(0, 5, (2, T))
    if sorted_ids:
        q_ids, kv_ids = np.sort(q_ids, 1), np.sort(kv_ids, 1)
        kv_ids[1] += 1  # batch row 1: some query segments have no keys
    spans = np.asarray(schedule.tile_spans(
        schedule.segment_span(jnp.asarray(q_ids), jnp.asarray(kv_ids)), tile))
    assert spans.shape == (2, 2, S // tile)
    for b in range(2):
        for t in range(S // tile):
            same = q_ids[b, t * tile:(t + 1) * tile, None] == kv_ids[b, None, :]
            keys = np.flatnonzero(same.any(0))
            lo, hi = spans[:, b, t]
            if sorted_ids:
                want = (keys[0], keys[-1] + 1) if keys.size else None
                assert (lo, hi) == want if want else hi <= lo
            else:
                assert (lo, hi) == (0, T)


# ---------------------------------------------------------------------------
# Argument checks (CPU).


def _qkv(seed, B, S, T, H, KH, D, dtype):
    """q, k, v of the given shapes (numpy's generator: nothing to compile)."""
    return inputs(Case(B, S, T, H, KH, D, dtype), seed)[:3]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(segment_ids=jnp.zeros((1, 64), jnp.int32)), "pair"),
    (dict(segment_ids=(jnp.zeros((1, 64), jnp.int32), jnp.zeros((1, 63), jnp.int32))), r"\(1, 63\)"),
    (dict(segment_ids=(jnp.zeros((1, 64)),) * 2), "integers"),
    (dict(logit_softcap=-3.0), "logit_softcap"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_unsupported_arguments_raise(kwargs, needle):
    q, k, v = _qkv(0, 1, 64, 64, 2, 1, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match=needle):
        mosaic_gpu.mosaic_flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("D,dq,dtype,folds", [
    (64, (64, 64, 2), jnp.bfloat16, True),
    (128, (64, 64, 2), jnp.bfloat16, True),
    (128, (64, 64, 3), jnp.float16, True),
    (128, (64, 128, 2), jnp.bfloat16, False),  # the lowering measures 233600 B of 232448
    (256, (64, 64, 1), jnp.bfloat16, False),
])
def test_dq_kernel_folds_delta_only_where_the_o_tile_fits(D, dq, dtype, folds):
    bs = dataclasses.replace(tuning.DEFAULTS[D], dq=tuning.KernelBlocks(*dq))
    spec = common.Spec(q_len=256, kv_len=256, causal=True, window=None, scale=1.0, blocks=bs)
    assert backward_queries.dq_folds_delta(spec, D, dtype) is folds


@pytest.mark.parametrize("plan,D", [("fused", 256), ("fused_dv_pass", 256), ("two_kernels", 256),
                                     ("two_kernels_xla_delta", 256), ("role_split", 128)])
def test_backward_plan_needs_its_head_dims(plan, D):
    q, k, v = _qkv(0, 1, 64, 64, 2, 1, D, jnp.bfloat16)
    blocks = dataclasses.replace(tuning.DEFAULTS[D], backward=plan)
    with pytest.raises(ValueError, match=f"backward plan '{plan}' takes head_dim .*head_dim={D}"):
        mosaic_gpu.mosaic_flash_attention(q, k, v, block_sizes=blocks)


def test_two_kernels_plan_needs_room_for_the_o_tile():
    q, k, v = _qkv(0, 1, 64, 64, 2, 1, 128, jnp.bfloat16)
    blocks = dataclasses.replace(tuning.DEFAULTS[128], dq=tuning.KernelBlocks(64, 128, 2),
                                 backward="two_kernels")
    with pytest.raises(ValueError, match="'two_kernels' needs shared memory .*block_kv=128"):
        mosaic_gpu.mosaic_flash_attention(q, k, v, block_sizes=blocks)


def test_every_backward_plan_has_a_kernel_composition():
    assert set(vjp.BACKWARD_PLANS) == set(tuning.BACKWARD_HEAD_DIMS)


@pytest.mark.parametrize("kernel", ["dq", "dkv"])
def test_head_dim_256_backward_needs_64x64_blocks(kernel):
    q, k, v = _qkv(0, 1, 64, 64, 2, 1, 256, jnp.bfloat16)
    blocks = dataclasses.replace(tuning.DEFAULTS[256], **{kernel: tuning.KernelBlocks(64, 128, 1)})
    with pytest.raises(ValueError, match=f"64x64 blocks.*{kernel}=.*block_kv=128"):
        mosaic_gpu.mosaic_flash_attention(q, k, v, block_sizes=blocks)


@pytest.mark.parametrize("D,plans", [
    (64, {"two_kernels", "two_kernels_xla_delta", "fused"}),
    (128, {"two_kernels", "two_kernels_xla_delta", "fused", "fused_dv_pass"}),
    (256, {"role_split"}),
])
def test_autotune_times_every_backward_plan(D, plans):
    # Candidates are applied on top of the defaults: each must name its plan,
    # or it silently takes the defaults' plan and the others are never timed.
    _, bwd = autotune.candidates(D)
    assert {dataclasses.replace(tuning.DEFAULTS[D], **c).backward for c in bwd} == plans


def test_backward_plan_is_checked_and_round_trips_through_the_table():
    with pytest.raises(ValueError, match="unknown backward plan 'fused_dq'"):
        dataclasses.replace(tuning.DEFAULTS[128], backward="fused_dq")
    bs = dataclasses.replace(tuning.DEFAULTS[128], backward="fused_dv_pass")
    assert tuning.MosaicBlockSizes.from_json(bs.to_json()) == bs
    entry = {k: v for k, v in bs.to_json().items() if k != "backward"}
    with pytest.raises(ValueError, match="names no backward plan"):
        tuning.MosaicBlockSizes.from_json(entry)


@pytest.mark.parametrize("shape_kv,dtype,needle", [
    (((1, 64, 2, 96), (1, 64, 1, 96)), jnp.bfloat16, "head_dim"),
    (((1, 64, 2, 64), (1, 64, 1, 64)), jnp.float32, "bfloat16 or float16"),
    (((1, 64, 3, 64), (1, 64, 2, 64)), jnp.bfloat16, "kv heads"),
])
def test_unsupported_shapes_are_reported(shape_kv, dtype, needle):
    (qs, ks) = shape_kv
    q = jnp.ones(qs, dtype)
    k = jnp.ones(ks, dtype)
    assert needle in vjp.shape_problem(q, k, k)
    with pytest.raises(ValueError, match=needle):
        mosaic_gpu.mosaic_flash_attention(q, k, k)


def test_supports_names_the_reason_off_hopper():
    q, k, v = _qkv(1, 1, 64, 64, 2, 1, 64, jnp.bfloat16)
    reason = mosaic_gpu.supports(q, k, v, causal=True)
    if jax.default_backend() == "gpu" and compat.is_hopper():
        assert reason is None
        assert mosaic_gpu.supports(q, k, v, logit_softcap=5.0) is None
        assert "logit_softcap" in mosaic_gpu.supports(q, k, v, logit_softcap=0.0)
    else:
        assert "Hopper" in reason


# ---------------------------------------------------------------------------
# Kernels against the reference on the shared case table (attention_cases.py).

# Kernels each backward plan adds to the forward's one.
PLAN_KERNELS = {"two_kernels": 2, "two_kernels_xla_delta": 2, "role_split": 2, "fused": 1,
                "fused_dv_pass": 2}
# "lower" lowers forward and backward for CUDA on CPU (Pallas -> Mosaic GPU
# checks operand types, layouts, swizzles and shared-memory transforms);
# "compiled" runs on the GPU against the reference.
RUNS = [pytest.param("lower", id="lower"),
        pytest.param("compiled", id="compiled", marks=pytest.mark.gpu)]


def _problem(case, mode):
    return problem(case, "mosaic_gpu", mode)


def test_case_table_coverage():
    """The Mosaic kernels leave out exactly the cases their argument checks
    refuse (float32, head dims other than 64, 128 and 256) and, on CPU, the
    GPU-only case; each run takes every backward plan."""
    refused = refusals(CASES, RUNS, _problem)
    assert set(refused) == {
        (name, run.id) for name, case in CASES.items() for run in RUNS
        if case.dtype == jnp.float32 or case.head_dim not in common.HEAD_DIMS
        or (case.compiled_only and run.id == "lower")}
    for run in RUNS:
        plans = {case.mosaic_blocks.backward for name, case in CASES.items()
                 if case.mosaic_blocks and (name, run.id) not in refused}
        assert plans == set(tuning.BACKWARD_HEAD_DIMS), run.id


@pytest.mark.parametrize("name,mode", case_params(CASES, RUNS, _problem))
def test_kernel_matches_reference(name, mode):
    case = CASES[name]

    def attention(q, k, v, segments):
        return mosaic_gpu.mosaic_flash_attention(q, k, v, segment_ids=segments,
                                                 block_sizes=case.mosaic_blocks,
                                                 **case.attention_kwargs())
    if mode == "compiled":
        check(name, attention)
        return
    lowered = jax.jit(functools.partial(out_and_grads, attention)).trace(
        *case.shapes()).lower(lowering_platforms=("cuda",))
    blocks = case.mosaic_blocks or tuning.block_sizes_for(compat.device_kind(), case.head_dim,
                                                          case.causal)
    kernels = lowered.as_text().count("custom_call @mosaic_gpu")
    assert kernels == 1 + PLAN_KERNELS[blocks.backward], blocks.backward
