"""Hopper grouped matmuls with two consumer warpgroups and a producer
(``consumers=2``): the work items, schedule, ragged rows and zero tail of
mosaic_gpu.py, with larger output tiles split between two warpgroups.

A block (one per SM, persistent) runs three warpgroups. The producer walks
the block's work items and streams each one's K steps (gmm) or row tiles
(tgmm) with TMA into a ring of shared-memory slots, running ahead across
item boundaries, so the next item's first steps arrive while the consumers
finish this one and store it. Each consumer owns half of the item's output
tile (gmm: half its rows; tgmm: half its K rows), keeps that half's float32
accumulator in registers and issues wgmma back to back, one in flight while
the previous step's slot is handed back; both must free a slot before the
producer refills it.

Registers: 384 threads launch at 168 a thread; the producer drops to
mosaic_common.PRODUCER_REGS (40) and the consumers rise to CONSUMER_REGS
(232): 40 + 2 x 232 = 504 = 3 x 168. A consumer's accumulator may take at
most ACC_REGS = 128 of its 232 (a 128x128 or 64x256 float32 half: 16384
values over 128 threads), leaving room for the epilogue's 16-bit copy of
the tile (64) and addresses. A 128x256 half (256 registers) cannot fit: that
is what spills in the one-consumer kernel's 128x256 tiles.

gmm: tiling (rows, K, N) is the whole item, rows 128 or 256 (64 or 128 per
consumer), each consumer's rows a separate TMA copy into its own slot so
its wgmma operand is a whole tile. The producer loads every item's full
row tile; a consumer whose rows hold none of the step's rows [lo, hi) (a
tile shared by two groups) only waits for and frees the slots, so the
other consumer has the tensor cores to itself. Each consumer stores its
own rows of [lo, hi) (mosaic_gpu.store_rows) from its own staging tile.

gmm with pingpong=True: the consumers take whole items in turn (a block's
items 0, 2, 4, ... to the first, 1, 3, 5, ... to the second) and tiling
(rows, K, N) is one consumer's item, rows 64 or 128. The ring is shared and
filled in item order, so one consumer's next item starts loading while the
other finishes its own: each consumer's epilogue (staging and storing its
tile) overlaps the other's products, where the split items above leave the
tensor cores idle while both store. The consumer that does not own an item
frees its ring steps without reading them, as a consumer without rows does
above.

tgmm: tiling (rows, K, N); each item's [K, N] output tile is split into two
[K/2, N] halves, K 128 or 256. Each consumer's lhs columns come as their own
TMA copy, so a consumer zeroes the rows of other groups in its own slot
(first and last row tile of the group) without waiting for the other. An
item's work is its group's row tiles, so the items go to the blocks sorted
by group size and dealt forwards and backwards in turn
(schedule.snake_index), which evens out the blocks' sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common as mc
from pallas_kernels.grouped_matmul import mosaic_gpu
from pallas_kernels.grouped_matmul.schedule import (make_schedule, num_steps, snake_count,
                                                     snake_index)

CONSUMERS = 2
ACC_REGS = 128   # float32 accumulator registers a consumer thread may hold
# Each consumer a 64x256 half (m64n256 wgmmas, the widest Hopper issues).
DEFAULT_TILING = (128, 64, 256)
DEFAULT_TGMM_TILING = (64, 128, 256)
# pingpong: a consumer's whole item, 128x128 (m64n128 wgmmas on two row halves).
DEFAULT_PINGPONG_TILING = (128, 64, 128)
THREADS = dict(num_threads=CONSUMERS + 1, thread_name="wg")
# Shared memory for the ring and staging tiles: the barriers take 16 bytes a
# stage (64 at 4 stages, read from a lowering that did not fit).
SMEM_BYTES = mc.SMEM_PER_BLOCK - 1024


def unsupported(tiling, op: str, out_dtype=None, pingpong: bool = False) -> str | None:
    """Why the two-consumer ``op`` ('gmm' or 'tgmm'; with ``pingpong`` the
    gmm whose consumers take whole items in turn) cannot take ``tiling``
    (None: its default) or ``out_dtype`` (None: the inputs'), or None when it
    can."""
    if out_dtype is not None and jnp.dtype(out_dtype).itemsize != 2:
        # Compiled on an H100 (jax 0.11.2), a float32 gmm output came out
        # wrong (relative error 7e-2) where bf16 outputs of the same
        # schedule matched the reference.
        return (f"consumers=2 stores 16-bit outputs only; got {jnp.dtype(out_dtype).name} "
                f"(preferred_element_type)")
    if tiling is None:
        return None
    if pingpong and op == "gmm":
        regs = tiling[0] * tiling[2] // 128
        if tiling[0] not in (64, 128):
            return (f"consumers=2 with pingpong gives each warpgroup a whole gmm item: its row "
                    f"tile must be 64 or 128; got tiling {tiling}")
        if regs > ACC_REGS:
            return (f"consumers=2 with pingpong gmm tiling {tiling} needs {regs} float32 "
                    f"accumulator registers a thread; at most {ACC_REGS} fit")
        return None
    split = tiling[0] if op == "gmm" else tiling[1]
    what = "row tile" if op == "gmm" else "K tile"
    if split not in (128, 256):
        return (f"consumers=2 splits the {op} {what} between two warpgroups: it must be 128 or "
                f"256 (64 or 128 a warpgroup); got tiling {tiling}")
    regs = split // CONSUMERS * tiling[2] // 128
    if regs > ACC_REGS:
        return (f"consumers=2 {op} tiling {tiling} needs {regs} float32 accumulator registers "
                f"a thread; at most {ACC_REGS} fit")
    return None


def _check(lhs, other, tiling, op, out_dtype, pingpong=False):
    mosaic_gpu.check(lhs, other, tiling)
    problem = unsupported(tiling, op, out_dtype, pingpong)
    if problem:
        raise ValueError(f"the Mosaic GPU kernel {problem}")


def _ring_barriers(depth, copies=CONSUMERS + 1):
    """A ring's ready barriers (the producer's ``copies`` TMA copies of a
    step) and free barriers (both consumers)."""
    return [plgpu.Barrier(num_arrivals=copies, num_barriers=depth),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=depth)]


def drain(free, depth, total):
    """The producer's last waits, for the consumers' frees of the ring's last
    ``depth`` steps (of ``total``): every barrier phase is observed before
    the block exits (the GPU interpreter checks this)."""
    @pl.loop(jnp.maximum(total - depth, 0), total)
    def _(t):
        plgpu.barrier_wait(free.at[lax.rem(t, depth)])


def produce(free, depth, t, steps, issue):
    """Producer: ring steps t .. t + steps - 1; for each, wait until both
    consumers freed its slot's previous use, then ``issue(slot, s)`` its TMA
    copies (s = step - t). -> the next step."""
    @pl.loop(0, steps)
    def _(s):
        slot = lax.rem(t + s, depth)

        @pl.when(t + s >= depth)
        def _():
            plgpu.barrier_wait(free.at[slot])
        issue(slot, s)
    return t + steps


def consume(ready, free, depth, t, steps, shape, mma):
    """A consumer's walk over ring steps t .. t + steps - 1: wait for each
    step's slot, ``mma(acc_ref, slot, s)`` issues its wgmma, one stays in
    flight while the previous step's slot is freed. -> the float32
    accumulator of ``shape`` (zeros for no steps)."""
    def walk(acc_ref):
        @pl.loop(0, steps)
        def _(s):
            slot = lax.rem(t + s, depth)
            plgpu.barrier_wait(ready.at[slot])
            mma(acc_ref, slot, s)
            plgpu.wgmma_wait(1)  # the previous step's product is done

            @pl.when(s > 0)
            def _():
                plgpu.barrier_arrive(free.at[lax.rem(t + s - 1, depth)])
        plgpu.wgmma_wait(0)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_arrive(free.at[lax.rem(t + steps - 1, depth)])
        return acc_ref[...]
    return pl.run_scoped(walk, plgpu.ACC(shape))


def release(ready, free, depth, t, steps):
    """A consumer that has no rows in an item frees its ring steps without
    reading them. It waits for each slot's fill first, so its arrival counts
    for that use of the slot (the fill waited for both frees of the last)."""
    @pl.loop(0, steps)
    def _(s):
        slot = lax.rem(t + s, depth)
        plgpu.barrier_wait(ready.at[slot])
        plgpu.barrier_arrive(free.at[slot])


def stage(tile, acc):
    """acc into this consumer's staging tile, once its previous stores have
    read the tile."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    tile[...] = acc.astype(tile.dtype)
    plgpu.commit_smem()


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype, tiling=None,
        pingpong=False, interpret=False):
    """tiling None: DEFAULT_PINGPONG_TILING with pingpong, else DEFAULT_TILING."""
    tiling = tiling or (DEFAULT_PINGPONG_TILING if pingpong else DEFAULT_TILING)
    _check(lhs, rhs, tiling, "gmm", out_dtype, pingpong)
    m, n = lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs, rhs = mosaic_gpu.aligned(lhs), mosaic_gpu.aligned(rhs)
    (m_pad, k), g = lhs.shape, rhs.shape[0]
    n_pad = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    # A consumer's rows of an item, and the lhs copies a ring step takes.
    rows, parts = (tm, 1) if pingpong else (tm // CONSUMERS, CONSUMERS)
    # Staging: one [rows, tn] tile a consumer, the item's size CONSUMERS / parts times.
    depth = mosaic_gpu.stages(tiling, jnp.dtype(out_dtype).itemsize * CONSUMERS // parts,
                              SMEM_BYTES)
    n_tiles, k_tiles = pl.cdiv(n_pad, tn), pl.cdiv(k, tk)
    items = num_steps(m_pad, tm, g + 1) * n_tiles
    n_programs = mosaic_gpu.programs(interpret)
    sched = make_schedule(group_sizes, m_pad, tm, zero_tail=True)

    def grouped_matmul(group_ref, tile_ref, lo_ref, hi_ref, first_ref, lhs_ref, rhs_ref,
                       out_ref, lhs_smem, rhs_smem, out_smem, ready, free):
        del first_ref  # each step stores only its own rows
        sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
        my_items = (items - 1 - sm) // n_programs + 1  # items sm, sm + n_programs, ...

        def item(i):
            """(group, row tile, lo, hi, N tile, ring steps) of this block's i-th item."""
            s = (sm + i * n_programs) // n_tiles
            j = (sm + i * n_programs) % n_tiles
            group, tile, lo, hi = group_ref[s], tile_ref[s], lo_ref[s], hi_ref[s]
            # No steps for an item without rows or in the zero tail (group g).
            steps = jnp.where((hi > lo) & (group < g), k_tiles, 0)
            return group, tile, lo, hi, j, steps

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(mc.PRODUCER_REGS, action="decrease")

            def fill(i, t):
                group, tile, _, _, j, steps = item(i)

                def issue(slot, kk):
                    cols = pl.ds(kk * tk, tk)
                    for c in range(parts):
                        plgpu.copy_gmem_to_smem(lhs_ref.at[pl.ds(tile * tm + c * rows, rows), cols],
                                                lhs_smem.at[slot, c], ready.at[slot])
                    w = (rhs_ref.at[group, pl.ds(j * tn, tn), cols] if transpose_rhs
                         else rhs_ref.at[group, cols, pl.ds(j * tn, tn)])
                    plgpu.copy_gmem_to_smem(w, rhs_smem.at[slot], ready.at[slot])
                return produce(free, depth, t, steps, issue)

            drain(free, depth, lax.fori_loop(0, my_items, fill, jnp.int32(0)))

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(mc.CONSUMER_REGS, action="increase")

            def run(i, t):
                _, tile, lo, hi, j, steps = item(i)
                part = 0 if pingpong else wg  # this consumer's lhs copy of a step
                row0 = tile * tm + part * rows
                # This consumer's rows of the step, relative to row0.
                my_lo = jnp.clip(lo - row0, 0, rows)
                my_hi = jnp.clip(hi - row0, 0, rows)
                mine = my_hi > my_lo
                if pingpong:
                    mine = mine & (lax.rem(i, CONSUMERS) == wg)

                @pl.when(mine)
                def _():
                    def mma(acc_ref, slot, _):
                        w = rhs_smem.at[slot]
                        plgpu.wgmma(acc_ref, lhs_smem.at[slot, part],
                                    w.transpose((1, 0)) if transpose_rhs else w)

                    # The zero tail (no steps) stores the untouched zero accumulator.
                    mine = out_smem.at[wg]
                    stage(mine, consume(ready, free, depth, t, steps, (rows, tn), mma))
                    mosaic_gpu.store_rows(mine, lambda offset, r, cols: out_ref.at[
                        pl.ds(row0 + offset, r), pl.ds(j * tn, cols)], my_lo, my_hi, my_lo, rows,
                        mosaic_gpu.last_tile_cols(j, n_pad, tn))

                # (the split schedule keeps its own test: its kernel lowers as before)
                @pl.when(jnp.logical_not(mine) if pingpong else my_hi <= my_lo)
                def _():  # the other consumer's item, or its rows hold all of the step's
                    release(ready, free, depth, t, steps)
                return t + steps

            lax.fori_loop(0, my_items, run, jnp.int32(0))
            mc.wait_stores_before_exit()

    rhs_block = (tn, tk) if transpose_rhs else (tk, tn)
    scratch = [mc.swizzled_smem((depth, parts, rows, tk), lhs.dtype),
               mc.swizzled_smem((depth, *rhs_block), rhs.dtype),
               plgpu.SMEM((CONSUMERS, rows, tn), out_dtype),
               *_ring_barriers(depth, parts + 1)]
    out = mosaic_gpu.launch(grouped_matmul, jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
                            scratch, interpret, **THREADS)(*sched, lhs, rhs)
    return out[:m, :n]


def tgmm(lhs, dout, group_sizes, *, out_dtype, tiling=None, interpret=False):
    """out[g] = lhs[rows_g]^T @ dout[rows_g]; tiling = (row tile, K tile, N
    tile), None: DEFAULT_TGMM_TILING."""
    tiling = tiling or DEFAULT_TGMM_TILING
    _check(lhs, dout, tiling, "tgmm", out_dtype)
    (m, k), n, g = lhs.shape, dout.shape[1], group_sizes.shape[0]
    lhs, dout = mosaic_gpu.aligned(lhs), mosaic_gpu.aligned(dout)
    k_pad, n_pad = lhs.shape[1], dout.shape[1]
    tr, tk, tn = tiling
    half = tk // CONSUMERS  # a consumer's K rows of the output tile
    depth = mosaic_gpu.stages((tk, tr, tn), jnp.dtype(out_dtype).itemsize, SMEM_BYTES)
    k_tiles, n_tiles = pl.cdiv(k_pad, tk), pl.cdiv(n_pad, tn)
    items = g * k_tiles * n_tiles
    n_programs = mosaic_gpu.programs(interpret)

    def transposed_grouped_matmul(start_ref, end_ref, first_ref, count_ref, order_ref, lhs_ref,
                                  dout_ref, out_ref, lhs_smem, dout_smem, out_smem, ready, free):
        sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
        my_items = snake_count(items, sm, n_programs)

        def item(i):
            """(group, K tile, N tile) of this block's i-th item."""
            idx = snake_index(i, sm, n_programs)
            return (order_ref[idx // (k_tiles * n_tiles)], idx // n_tiles % k_tiles,
                    idx % n_tiles)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(mc.PRODUCER_REGS, action="decrease")

            def fill(i, t):
                grp, ki, ni = item(i)
                first = first_ref[grp]

                def issue(slot, tt):
                    rows = pl.ds((first + tt) * tr, tr)
                    for c in range(CONSUMERS):
                        plgpu.copy_gmem_to_smem(lhs_ref.at[rows, pl.ds(ki * tk + c * half, half)],
                                                lhs_smem.at[slot, c], ready.at[slot])
                    plgpu.copy_gmem_to_smem(dout_ref.at[rows, pl.ds(ni * tn, tn)],
                                            dout_smem.at[slot], ready.at[slot])
                return produce(free, depth, t, count_ref[grp], issue)

            drain(free, depth, lax.fori_loop(0, my_items, fill, jnp.int32(0)))

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(mc.CONSUMER_REGS, action="increase")

            def run(i, t):
                grp, ki, ni = item(i)
                start, end = start_ref[grp], end_ref[grp]
                first, count = first_ref[grp], count_ref[grp]

                def mma(acc_ref, slot, tt):
                    mine = lhs_smem.at[slot, wg]

                    # Rows of the group's first and last tile that belong to
                    # other groups are zeroed before use.
                    @pl.when((tt == 0) | (tt == count - 1))
                    def _():
                        mosaic_gpu.zero_other_groups(mine, (first + tt) * tr, start, end)

                    plgpu.wgmma(acc_ref, mine.transpose((1, 0)), dout_smem.at[slot])

                # An empty group (no steps) stores the untouched zero accumulator.
                stage(out_smem.at[wg], consume(ready, free, depth, t, count, (half, tn), mma))
                plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[
                    grp, pl.ds(ki * tk + wg * half, half), pl.ds(ni * tn, tn)])
                return t + count

            lax.fori_loop(0, my_items, run, jnp.int32(0))
            mc.wait_stores_before_exit()

    scratch = [mc.swizzled_smem((depth, CONSUMERS, tr, half), lhs.dtype),
               mc.swizzled_smem((depth, tr, tn), dout.dtype),
               plgpu.SMEM((CONSUMERS, half, tn), out_dtype),
               *_ring_barriers(depth)]
    tiles = mosaic_gpu.group_tiles(group_sizes, m, tr)
    # Items by descending work (their group's row tiles), dealt by
    # snake_index: blocks taking every n_programs-th item of groups in id
    # order differ by about a group's size, and the kernel waits for the
    # busiest (docs/design/grouped-matmul.md counts both deals).
    order = jnp.argsort(-tiles[3], stable=True).astype(jnp.int32)
    out = mosaic_gpu.launch(transposed_grouped_matmul,
                            jax.ShapeDtypeStruct((g, k_pad, n_pad), out_dtype),
                            scratch, interpret, **THREADS)(*tiles, order, lhs, dout)
    return out[:, :k, :n]
