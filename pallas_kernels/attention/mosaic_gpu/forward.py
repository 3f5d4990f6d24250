"""The forward kernel: out and the base-2 logsumexp of every query row.

Persistent: one block per multiprocessor runs a list of tiles of
2*block_q query rows, planned on the host (``persistent_schedule``); for each
it walks the key blocks that any of its rows can see (others are skipped by
the loop bounds), masking only the blocks that cut the mask. Softmax is
online, in base 2: the row max is kept in raw logits, so scale*log2(e) and
the max subtraction are one FMA. With ``pingpong`` the consumers take turns
so one's softmax overlaps the other's matrix products.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention.mosaic_gpu.common import (CONSUMERS, FWD_REGS, LOG2E, SMEM_SPARE,
                                                        Spec, kernel_call, masked_logits, mma_acc,
                                                        sweep, vector, zeros)
from pallas_kernels.attention.mosaic_gpu.rings import (kv_issue, kv_ring_scratch,
                                                       query_kernel_refs, ring_steps,
                                                       segment_operands, segment_scratch)
from pallas_kernels.attention.mosaic_gpu.schedule import (kv_block_range, narrow,
                                                          persistent_schedule)


def forward(q, k, v, segs, spec: Spec):
    """q [B,Sp,H,D], k/v [B,Tp,KH,D] padded, segs None or (q ids [B,Sp], kv
    ids [B,Tp]) -> (out [B,Sp,H,D], lse2 [B,H,Sp]).

    lse2 is the base-2 logsumexp of the scaled logits, +inf for rows that see
    no key (so the backward's exp2(s - lse2) is 0 there).

    Persistent: one block per multiprocessor runs a list of query tiles
    (``persistent_schedule``). The producer streams K and V through one ring
    across tiles, so the next tile's first blocks arrive during this tile's
    last steps; each consumer loads its next tile's Q during this one (two Q
    buffers, the output leaves through the finished one)."""
    B, Sp, H, D = q.shape
    G = H // k.shape[2]
    cfg = spec.blocks.fwd
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    pingpong = spec.blocks.pingpong
    rows = CONSUMERS * bq
    tiles = Sp // rows
    with jax.ensure_compile_time_eval():  # the tiles' lengths, for the schedule
        lo_all, _, _, hi_all = kv_block_range(jnp.arange(tiles, dtype=jnp.int32) * rows, rows,
                                              block_kv=bkv, **spec.ranges())
        steps = tuple(int(x) for x in jnp.broadcast_to(hi_all - lo_all, (tiles,)))
    table = persistent_schedule(B * H, tiles, steps, compat.sm_count())
    dtype = q.dtype
    c = spec.exp_scale
    # Two Q buffers a consumer where they fit beside the ring (not at head_dim
    # 256): with one, a tile's Q load waits for the previous output's store.
    size = jnp.dtype(dtype).itemsize * D
    two_q = (2 * CONSUMERS * bq + 2 * stages * bkv) * size + SMEM_SPARE
    q_bufs = 2 if two_q <= mc.SMEM_PER_BLOCK else 1

    def body(q_ref, k_ref, v_ref, sched_ref, *refs):
        segs, (o_ref, lse_ref, q_smem, lse_smem, q_ready, turn), ring = \
            query_kernel_refs(spec, refs, 6)
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
        n_items = sched_ref[sm, 0]

        def item(n):
            """(b, h, first row, key-block range) of this block's n-th tile."""
            code = sched_ref[sm, 1 + n]
            pair, tile = lax.div(code, tiles), lax.rem(code, tiles)
            b, h = lax.div(pair, H), lax.rem(pair, H)
            lo, flo, fhi, hi = kv_block_range(tile * rows, rows, block_kv=bkv, **spec.ranges())
            if segs is not None:
                lo, hi = narrow(lo, hi, segs.spans, b, tile, bkv)
            return b, h, tile * rows, (lo, flo, fhi, hi)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(FWD_REGS[0], action="decrease")

            def tile_blocks(n, t0):  # t0: ring steps of the earlier tiles
                b, h, _, (lo, _, _, hi) = item(n)
                issue = kv_issue(k_ref, v_ref, ring, b, lax.div(h, G), lo, bkv, segs)
                ring_steps(t0, hi - lo, stages, issue, (k_free, v_free))
                return t0 + (hi - lo)
            lax.fori_loop(0, n_items, tile_blocks, jnp.int32(0))

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(FWD_REGS[1], action="increase")

            def load_q(n, buf):
                b, h, r0, _ = item(n)
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0 + wg * bq, bq), h],
                                        q_smem.at[wg, buf], q_ready.at[2 * wg + buf])

            def take_turn():
                if pingpong:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            def run_tile(n, t0):
                buf = lax.rem(n, q_bufs)
                my_q = q_smem.at[wg, buf]
                b, h, r0, blocks = item(n)
                lo = blocks[0]
                row0 = r0 + wg * bq
                qs_v = segs.own(b, row0, bq, wg) if segs else None
                # The previous tile's output stores have read their buffers:
                # the other Q buffer may take the next tile's rows.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                if q_bufs == 2:
                    @pl.when(n + 1 < n_items)
                    def _():
                        load_q(n + 1, 1 - buf)
                else:
                    load_q(n, buf)
                plgpu.barrier_wait(q_ready.at[2 * wg + buf])

                def step(j, carry, masked):
                    acc, m, l = carry
                    slot = lax.rem(t0 + j - lo, stages)
                    ks_v = segs.at(slot) if segs else None  # read before the slot is freed with K
                    plgpu.barrier_wait(k_ready.at[slot])

                    def qk(s_ref):
                        plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        take_turn()  # the other consumer's softmax overlaps this product
                        return s_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    s = spec.forward_logits(s)
                    if masked:
                        s = masked_logits(spec, s, row0, j, qs_v, ks_v)
                    # m is the running row max of the logits before the factor c:
                    # scaling and the max subtraction are then one FMA per logit.
                    m_new = jnp.maximum(m, s.max(axis=1))
                    # A row that has seen no key yet keeps m = -inf; subtract 0 then.
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    m_scaled = m_use * c
                    alpha = jnp.exp2(m * c - m_scaled)
                    p = jnp.exp2(s * c - mc.rows(m_scaled, s.shape))
                    l = l * alpha + p.sum(axis=1)
                    acc = acc * mc.rows(alpha, acc.shape)
                    p16 = p.astype(dtype)
                    if pingpong:  # hand the tensor cores over; take them back for P V
                        plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(v_ready.at[slot])
                    if pingpong:
                        plgpu.barrier_wait(turn)
                    acc = mma_acc(acc, p16, v_smem.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                carry = (zeros((bq, D)), vector(bq, -jnp.inf, 1), vector(bq, 0.0, 1))
                acc, m, l = sweep(step, *spec.sweep_blocks(*blocks), carry)
                empty = l == 0.0
                inv_l = 1.0 / jnp.where(empty, 1.0, l)
                my_q[...] = (acc * mc.rows(inv_l, acc.shape)).astype(dtype)
                lse_smem.at[wg][...] = jnp.where(empty, jnp.inf,
                                                 m * c + jnp.log(jnp.where(empty, 1.0, l)) * LOG2E)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(row0, bq), h])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
                return t0 + (blocks[3] - lo)

            if q_bufs == 2:
                @pl.when(n_items > 0)
                def _():
                    load_q(0, 0)
            if pingpong:  # consumer 1 runs half a step behind consumer 0 throughout
                pl.when(wg == 1)(take_turn)
            lax.fori_loop(0, n_items, run_tile, jnp.int32(0))
            if pingpong:
                pl.when(wg == 0)(take_turn)
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((CONSUMERS, q_bufs, bq, D), dtype),
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        plgpu.Barrier(num_barriers=2 * CONSUMERS),
        plgpu.Barrier(num_arrivals=CONSUMERS),
        *kv_ring_scratch(cfg, D, dtype),
    ] + (segment_scratch(bq, stages, bkv) if spec.segments else [])
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((B, H, Sp), jnp.float32))
    return kernel_call(body, out_type, scratch, (table.shape[0],), ("sm",))(
        q, k, v, jnp.asarray(table), *segment_operands(segs, rows))
