"""Tests of the Hopper (Pallas Mosaic GPU) flash-attention kernels.

The kernels run compiled only on an sm_90 GPU (``compiled`` cases, marked
``gpu``). They cannot run under Mosaic GPU interpret mode
(``InterpretGPUParams``) in jax 0.10.2: its wgmma reads both operands from
shared memory as plain arrays, so the transposed operand views
(``transpose_ref``, needed for Q K^T, dO V^T and K Q^T) fail with
"'TransposeTransform' object has no attribute 'indices'", and a register (not
shared-memory) left operand, used for P V, is not supported. On CPU the same
cases are instead lowered for CUDA (``lower``), which checks layouts,
swizzles and shared-memory transforms of every kernel.

On CPU this module also tests the block ranges that decide which tiles each
kernel visits and masks (against the mask itself), and that unsupported
arguments are reported and refused.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.attention import autotune, mosaic_gpu, tuning
from pallas_kernels.attention.mosaic_gpu import backward_queries, common, schedule, vjp
from pallas_kernels.attention.mask import visible
from pallas_kernels.attention.reference import attention_reference

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
def testblock_order_visits_every_tile_once_in_groups_that_fill_the_gpu(pairs, tiles):
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
def testpersistent_schedule_runs_every_tile_once_balanced(pairs, tiles, causal):
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
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, S, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, KH, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, KH, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, S, H, D), jnp.float32).astype(dtype)
    return q, k, v, do


@pytest.mark.parametrize("kwargs,needle", [
    (dict(segment_ids=jnp.zeros((1, 64), jnp.int32)), "pair"),
    (dict(segment_ids=(jnp.zeros((1, 64), jnp.int32), jnp.zeros((1, 63), jnp.int32))), r"\(1, 63\)"),
    (dict(segment_ids=(jnp.zeros((1, 64)),) * 2), "integers"),
    (dict(logit_softcap=-3.0), "logit_softcap"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_unsupported_arguments_raise(kwargs, needle):
    q, k, v, _ = _qkv(0, 1, 64, 64, 2, 1, 64, jnp.bfloat16)
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
    q, k, v, _ = _qkv(0, 1, 64, 64, 2, 1, D, jnp.bfloat16)
    blocks = dataclasses.replace(tuning.DEFAULTS[D], backward=plan)
    with pytest.raises(ValueError, match=f"backward plan '{plan}' takes head_dim .*head_dim={D}"):
        mosaic_gpu.mosaic_flash_attention(q, k, v, block_sizes=blocks)


def test_two_kernels_plan_needs_room_for_the_o_tile():
    q, k, v, _ = _qkv(0, 1, 64, 64, 2, 1, 128, jnp.bfloat16)
    blocks = dataclasses.replace(tuning.DEFAULTS[128], dq=tuning.KernelBlocks(64, 128, 2),
                                 backward="two_kernels")
    with pytest.raises(ValueError, match="'two_kernels' needs shared memory .*block_kv=128"):
        mosaic_gpu.mosaic_flash_attention(q, k, v, block_sizes=blocks)


def test_every_backward_plan_has_a_kernel_composition():
    assert set(vjp.BACKWARD_PLANS) == set(tuning.BACKWARD_HEAD_DIMS)


@pytest.mark.parametrize("kernel", ["dq", "dkv"])
def test_head_dim_256_backward_needs_64x64_blocks(kernel):
    q, k, v, _ = _qkv(0, 1, 64, 64, 2, 1, 256, jnp.bfloat16)
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
    q, k, v, _ = _qkv(1, 1, 64, 64, 2, 1, 64, jnp.bfloat16)
    reason = mosaic_gpu.supports(q, k, v, causal=True)
    if jax.default_backend() == "gpu" and compat.is_hopper():
        assert reason is None
        assert mosaic_gpu.supports(q, k, v, logit_softcap=5.0) is None
        assert "logit_softcap" in mosaic_gpu.supports(q, k, v, logit_softcap=0.0)
    else:
        assert "Hopper" in reason


# ---------------------------------------------------------------------------
# Kernels against the reference (GPU).

GPU_CASES = [
    # B, S, T, H, KH, D, causal, window, dtype[, options: blocks (tuning.MosaicBlockSizes),
    # softcap, segments (number of packed segments: sorted random ids)]
    (2, 256, 256, 2, 1, 128, True, None, jnp.bfloat16),
    (1, 200, 200, 4, 2, 128, False, None, jnp.bfloat16),
    (1, 130, 330, 4, 4, 64, True, None, jnp.float16),
    (1, 330, 130, 2, 1, 128, True, None, jnp.bfloat16),
    (1, 190, 190, 2, 2, 256, True, None, jnp.bfloat16),
    (1, 300, 300, 4, 2, 64, False, None, jnp.bfloat16),
    (1, 300, 300, 2, 1, 128, True, 100, jnp.bfloat16),
    (1, 260, 260, 2, 2, 64, False, 90, jnp.float16),
    # Enough blocks for several groups in block_order (forward, dQ and dK/dV).
    (4, 2000, 2000, 8, 4, 64, True, None, jnp.bfloat16),
]
def _rel(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(x).all()
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# The other code paths: forward without ping-pong, other block sizes and depths.
KB = tuning.KernelBlocks
GPU_CASES += [
    (2, 300, 300, 4, 2, 128, True, None, jnp.bfloat16,
     dict(blocks=dataclasses.replace(tuning.DEFAULTS[128], fwd=KB(64, 64, 3), dkv=KB(64, 64, 3),
                                     backward="two_kernels"))),
    (1, 250, 250, 2, 1, 128, False, 70, jnp.float16,
     dict(blocks=dataclasses.replace(tuning.DEFAULTS[128], pingpong=False, fwd=KB(64, 64, 3),
                                     dq=KB(64, 128, 2), dkv=KB(64, 64, 3),
                                     backward="two_kernels_xla_delta"))),
    (1, 200, 330, 2, 2, 64, True, None, jnp.bfloat16,
     dict(blocks=dataclasses.replace(tuning.DEFAULTS[64], pingpong=False, fwd=KB(64, 256, 2),
                                     dq=KB(64, 128, 2), backward="two_kernels"))),
    (1, 190, 190, 2, 1, 256, True, 50, jnp.bfloat16, dict(blocks=tuning.DEFAULTS[256])),
    # head_dim 256's role-split dQ and dK/dV kernels: GQA at unequal lengths, one stage.
    (1, 200, 330, 4, 2, 256, False, None, jnp.float16),
    (1, 330, 200, 4, 1, 256, True, 70, jnp.bfloat16,
     dict(blocks=dataclasses.replace(tuning.DEFAULTS[256], dq=KB(64, 64, 1), dkv=KB(64, 64, 1)),
          softcap=2.0)),
]
# dQ fused into the dK/dV kernel: GQA, odd and unequal lengths, windows. At
# head_dim 64 the consumers take alternate steps' dQ tiles (128: column halves).
FUSED = tuning.DEFAULTS[128]
FUSED64 = tuning.DEFAULTS[64]
assert FUSED.backward == FUSED64.backward == "fused"
GPU_CASES += [
    (2, 300, 300, 4, 2, 128, True, None, jnp.bfloat16, dict(blocks=FUSED)),
    (1, 200, 330, 4, 1, 128, False, None, jnp.float16, dict(blocks=FUSED)),
    (1, 330, 200, 2, 2, 128, True, 70, jnp.bfloat16, dict(blocks=FUSED)),
    (2, 300, 300, 4, 2, 64, True, None, jnp.bfloat16, dict(blocks=FUSED64)),
    (1, 200, 330, 4, 1, 64, False, None, jnp.float16, dict(blocks=FUSED64)),
    (1, 330, 200, 2, 2, 64, True, 70, jnp.bfloat16, dict(blocks=FUSED64, softcap=2.5, segments=3)),
]
# dQ fused into the dK kernel with dV in its own pass.
FUSED_DV = dataclasses.replace(FUSED, backward="fused_dv_pass")
GPU_CASES += [
    (2, 300, 300, 4, 2, 128, True, None, jnp.bfloat16, dict(blocks=FUSED_DV)),
    (1, 200, 330, 4, 1, 128, False, 90, jnp.float16, dict(blocks=FUSED_DV, softcap=2.5, segments=3)),
]
# Segment ids (packed sequences) and logit soft-capping, alone and together, in
# every kernel variant (two dQ kernels, fused dQ, head_dim 256's role-split kernels).
# A small cap (2-3) bends most logits; unequal lengths draw q and kv ids
# separately, so some query rows see no key at all.
GPU_CASES += [
    (2, 300, 300, 4, 2, 128, True, None, jnp.bfloat16, dict(segments=3)),
    (1, 130, 330, 2, 1, 64, False, None, jnp.float16, dict(segments=2)),
    (1, 200, 200, 4, 2, 64, True, 60, jnp.bfloat16, dict(softcap=2.0)),
    (1, 190, 190, 2, 2, 256, True, None, jnp.bfloat16, dict(softcap=3.0, segments=2)),
    (1, 300, 300, 4, 2, 128, False, None, jnp.bfloat16,
     dict(blocks=FUSED, softcap=2.5, segments=4)),
    (1, 260, 330, 2, 1, 128, True, 70, jnp.bfloat16, dict(segments=3)),  # window cuts spans
]


def _case_id(case):
    B, S, T, H, KH, D, causal, window, dtype, *opts = case
    opts = opts[0] if opts else {}
    bs = opts.get("blocks")
    tag = ("" if bs is None else f"-{bs.backward}" if bs.backward.startswith("fused") else
           f"-blocks{bs.fwd.block_kv}x{bs.dkv.stages}{'pp' if bs.pingpong else ''}")
    tag += f"-cap{opts['softcap']}" if "softcap" in opts else ""
    tag += f"-seg{opts['segments']}" if "segments" in opts else ""
    return (f"B{B}-S{S}-T{T}-H{H}-KH{KH}-D{D}-{'causal' if causal else 'full'}-w{window}"
            f"-{jnp.dtype(dtype).name}{tag}")


def _segment_ids(seed, B, S, T, n):
    """Sorted random ids in [0, n): packed sequences. One array for both sides
    when S == T, else independent draws for q and kv."""
    kq, kk = jax.random.split(jax.random.key(seed + 1))
    ids = lambda key, L: jnp.sort(jax.random.randint(key, (B, L), 0, n), axis=1)
    q_seg = ids(kq, S)
    return (q_seg, q_seg) if S == T else (q_seg, ids(kk, T))


# "lower": lower forward and backward for CUDA on CPU (Pallas -> Mosaic GPU
# checks operand types, layouts, swizzles and shared-memory transforms);
# "compiled": run on the GPU against the reference.
MODES = [pytest.param("lower", id="lower"),
         pytest.param("compiled", id="compiled", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_kernel_matches_reference(case, mode):
    B, S, T, H, KH, D, causal, window, dtype, *opts = case
    opts = opts[0] if opts else {}
    seed = hash(case[:8]) % 2**31
    q, k, v, do = _qkv(seed, B, S, T, H, KH, D, dtype)
    kw = dict(causal=causal, sliding_window=window, logit_softcap=opts.get("softcap"))
    if "segments" in opts:
        kw["segment_ids"] = _segment_ids(seed, B, S, T, opts["segments"])

    def kernel_vjp(q, k, v, do):
        out, vjp = jax.vjp(lambda *a: mosaic_gpu.mosaic_flash_attention(
            *a, **kw, block_sizes=opts.get("blocks")), q, k, v)
        return out, *vjp(do)
    if mode == "lower":
        text = jax.jit(kernel_vjp).trace(q, k, v, do).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("mosaic_gpu") >= 2  # forward and backward kernels
        return
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_vjp = jax.vjp(lambda *a: attention_reference(*a, **kw), *f32)
    ref_grads = ref_vjp(do.astype(jnp.float32))
    out, *grads = kernel_vjp(q, k, v, do)

    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, ref_out) < 2e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape
        assert _rel(g, r) < 2e-2, name
