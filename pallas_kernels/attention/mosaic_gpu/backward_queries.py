"""Backward kernels over queries: dQ, query-parallel. A block owns query rows
and streams the K and V blocks they see through a ring.

Where shared memory holds an O tile too (``dq_folds_delta``), the dQ kernel
can form delta = rowsum(dO*O) for the key-parallel kernel that follows
(backward plan ``two_kernels``); else XLA does, one more pass over O and
dO. At head_dim 256 two consumers' Q and dO tiles leave room for one K/V
stage, so ``backward_dq_roles`` gives both consumers the same rows and splits
each step by role.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention.mosaic_gpu.common import (BWD_REGS, CONSUMERS, SMEM_SPARE, Spec,
                                                        kernel_call, masked_logits, mma_acc,
                                                        sweep, zeros)
from pallas_kernels.attention.mosaic_gpu.rings import (kv_ring_scratch, query_kernel_refs,
                                                       query_tile, segment_operands,
                                                       segment_scratch)
from pallas_kernels.attention.mosaic_gpu.schedule import block_order


def dq_folds_delta(spec: Spec, D, dtype) -> bool:
    """Whether the dQ kernel has shared memory for an O tile beside Q, dO and
    the K/V ring, to form delta itself (not at head_dim 256)."""
    cfg = spec.blocks.dq
    tiles = 3 * CONSUMERS * cfg.block_q + 2 * cfg.stages * cfg.block_kv
    return tiles * D * jnp.dtype(dtype).itemsize + SMEM_SPARE <= mc.SMEM_PER_BLOCK


def backward_dq(q, k, v, do, lse, out_or_delta, segs, spec: Spec, *, fold: bool):
    """dQ [B,Sp,H,D], and delta = rowsum(dO*O) [B,H,Sp] with ``fold`` (then
    ``out_or_delta`` is O: the rows' dO and O tiles are in shared memory at
    the start anyway, and the key-parallel kernel reads the delta written
    here; it needs ``dq_folds_delta``); else ``out_or_delta`` is delta and
    the second result None."""
    B, Sp, H, D = q.shape
    G = H // k.shape[2]
    cfg = spec.blocks.dq
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    grid, names = block_order(B * H, Sp // (CONSUMERS * bq))
    dtype = q.dtype

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, od_ref, *refs):
        segs, own, ring = query_kernel_refs(spec, refs, 6 + 2 * fold)
        if fold:  # delta's output and the O tiles
            (dq_ref, delta_out, *own), o_smem = own[:-1], own[-1]
        else:
            dq_ref, *own = own
        q_smem, do_smem, lse_smem, delta_smem, row_ready = own
        tile = query_tile(spec, cfg, grid, H, G, CONSUMERS * bq, k_ref, v_ref, ring, BWD_REGS,
                          segs)
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        b, h, wg = tile.b, tile.h, tile.wg
        lo = tile.blocks[0]

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(BWD_REGS[1], action="increase")
            row0 = tile.r0 + wg * bq
            rows = (b, pl.ds(row0, bq), h)
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            ready = [row_ready.at[wg * 4 + i] for i in range(4)]
            plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, ready[0])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], my_do, ready[1])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(row0, bq)], lse_smem.at[wg], ready[2])
            vec = (b, h, pl.ds(row0, bq))
            if fold:
                plgpu.copy_gmem_to_smem(od_ref.at[rows], o_smem.at[wg], ready[3])
            else:
                plgpu.copy_gmem_to_smem(od_ref.at[vec], delta_smem.at[wg], ready[3])
            qs_v = segs.own(b, row0, bq, wg) if segs else None
            for bar in ready:
                plgpu.barrier_wait(bar)
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lse_v = plgpu.load(lse_smem.at[wg], (), layout=row_layout)
            if fold:
                f32 = lambda ref: ref[...].astype(jnp.float32)  # noqa: E731
                delta_v = jnp.sum(f32(my_do) * f32(o_smem.at[wg]), axis=1)
                delta_smem.at[wg][...] = delta_v
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(delta_smem.at[wg], delta_out.at[vec])
            else:
                delta_v = plgpu.load(delta_smem.at[wg], (), layout=row_layout)

            def step(j, dq, masked):
                slot = lax.rem(j - lo, stages)
                ks_v = segs.at(slot) if segs else None
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                def s_and_dp(s_ref, dp_ref):  # both in flight, one wait
                    plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    plgpu.wgmma(dp_ref, my_do, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                    return s_ref[...], dp_ref[...]
                acc = plgpu.ACC((bq, bkv), jnp.float32)
                s, dp = pl.run_scoped(s_and_dp, acc, acc)
                plgpu.barrier_arrive(v_free.at[slot])
                s, dcap = spec.base2_logits(s)
                if masked:
                    s = masked_logits(spec, s, row0, j, qs_v, ks_v)
                p = jnp.exp2(s - mc.rows(lse_v, s.shape))
                ds = p * (dp - mc.rows(delta_v, dp.shape))
                if dcap is not None:
                    ds = ds * dcap
                dq = mma_acc(dq, ds.astype(dtype), k_smem.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = sweep(step, *spec.sweep_blocks(*tile.blocks), zeros((bq, D)))
            my_q[...] = (dq * spec.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows])
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((CONSUMERS, bq, D), dtype),
        mc.swizzled_smem((CONSUMERS, bq, D), dtype),
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        plgpu.Barrier(num_barriers=CONSUMERS * 4),
        *([mc.swizzled_smem((CONSUMERS, bq, D), dtype)] if fold else []),
        *kv_ring_scratch(cfg, D, dtype),
    ] + (segment_scratch(bq, stages, bkv) if spec.segments else [])
    out_type = jax.ShapeDtypeStruct(q.shape, dtype)
    if fold:
        out_type = (out_type, jax.ShapeDtypeStruct(lse.shape, jnp.float32))
    res = kernel_call(body, out_type, scratch, grid, names)(
        q, k, v, do, lse, out_or_delta, *segment_operands(segs, CONSUMERS * bq))
    return tuple(res) if fold else (res, None)


def backward_dq_roles(q, k, v, do, lse, delta, segs, spec: Spec):
    """dQ for head_dim 256, where the query-parallel kernel's Q and dO tiles
    for two consumers' rows leave shared memory for one K/V stage only.

    The consumers share a block's block_q query rows and split each step by
    role: consumer 1 forms P = exp(S - lse) from Q K^T and hands it over in
    shared memory; consumer 0 forms dP = dO V^T and dS = P (dP - delta) and
    hands dS back; each adds dS K into its half of dQ's columns. One Q and
    one dO tile stay resident, so the K/V ring gets two stages. They are kept
    as column halves, so each consumer's dQ half leaves through a contiguous
    half of its own tile (TMA takes no strided shared memory)."""
    B, Sp, H, D = q.shape
    G = H // k.shape[2]
    cfg = spec.blocks.dq
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    assert (bq, bkv) == (64, 64), "checked by mosaic_flash_attention"
    grid, names = block_order(B * H, Sp // bq)
    dtype = q.dtype
    ds_side, p_side = 0, 1  # consumer warpgroups by role
    half = D // 2

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        segs, own, ring = query_kernel_refs(spec, refs, 11)
        (dq_ref, q_smem, do_smem, vec_smem, p_smem, ds_smem, row_ready,
         p_ready, p_free, ds_ready, ds_free) = own
        tile = query_tile(spec, cfg, grid, H, G, bq, k_ref, v_ref, ring, BWD_REGS, segs)
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        b, h, wg, lo = tile.b, tile.h, tile.wg, tile.blocks[0]
        vec = (b, h, pl.ds(tile.r0, bq))
        row_layout = plgpu.Layout.WGMMA.reduce(1)

        def own_tiles(tile_ref, tile_smem, vec_ref):
            """This consumer's resident tile (Q or dO, in column halves) and
            row vector (lse or delta)."""
            ready = [row_ready.at[3 * wg + i] for i in range(3)]
            for u in range(2):
                plgpu.copy_gmem_to_smem(tile_ref.at[b, pl.ds(tile.r0, bq), h, pl.ds(u * half, half)],
                                        tile_smem.at[u], ready[u])
            plgpu.copy_gmem_to_smem(vec_ref.at[vec], vec_smem.at[wg], ready[2])
            for bar in ready:
                plgpu.barrier_wait(bar)
            return plgpu.load(vec_smem.at[wg], (), layout=row_layout)

        def by_halves(tile_smem, other):
            """tile @ other^T for a resident tile in column halves."""
            def body(acc):
                for u in range(2):
                    plgpu.wgmma(acc, tile_smem.at[u], plgpu.transpose_ref(
                        other.at[:, pl.ds(u * half, half)], (1, 0)))
                return acc[...]
            return pl.run_scoped(body, plgpu.ACC((bq, bkv), jnp.float32))

        def sweep_and_store(step, tile_smem, u):
            """Run the steps into this consumer's dQ column half u and write it
            out through that half of its (no longer read) resident tile."""
            dq = sweep(step, *spec.sweep_blocks(*tile.blocks), zeros((bq, half)))
            out = tile_smem.at[u]
            out[...] = (dq * spec.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, dq_ref.at[b, pl.ds(tile.r0, bq), h, pl.ds(u * half, half)])
            mc.wait_stores_before_exit()

        @pl.when(wg == p_side)
        def _p_side():
            plgpu.set_max_registers(BWD_REGS[1], action="increase")
            lse_v = own_tiles(q_ref, q_smem, lse_ref)
            qs_v = segs.own(b, tile.r0, bq, p_side) if segs else None
            plgpu.barrier_arrive(ds_free)  # the dS tile starts free

            def step(j, dq, masked):
                slot = lax.rem(j - lo, stages)
                plgpu.barrier_arrive(v_free.at[slot])  # V is the other side's
                ks_v = segs.at(slot) if segs else None
                plgpu.barrier_wait(k_ready.at[slot])
                s, dcap = spec.base2_logits(by_halves(q_smem, k_smem.at[slot]))
                if masked:
                    s = masked_logits(spec, s, tile.r0, j, qs_v, ks_v)
                p = jnp.exp2(s - mc.rows(lse_v, s.shape))
                plgpu.barrier_wait(p_free)
                p_smem[...] = p if dcap is None else p * dcap
                plgpu.barrier_arrive(p_ready)
                plgpu.barrier_wait(ds_ready)
                dq = mma_acc(dq, ds_smem, k_smem.at[slot, :, pl.ds(half, half)])
                plgpu.barrier_arrive(ds_free)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            sweep_and_store(step, q_smem, 1)

        @pl.when(wg == ds_side)
        def _ds_side():
            plgpu.set_max_registers(BWD_REGS[1], action="increase")
            delta_v = own_tiles(do_ref, do_smem, delta_ref)
            plgpu.barrier_arrive(p_free)  # the P tile starts free

            def step(j, dq, masked):
                del masked  # P comes masked
                slot = lax.rem(j - lo, stages)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = by_halves(do_smem, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                plgpu.barrier_wait(p_ready)
                p = p_smem[...]
                plgpu.barrier_arrive(p_free)
                ds = (p * (dp - mc.rows(delta_v, dp.shape))).astype(dtype)
                plgpu.barrier_wait(ds_free)
                ds_smem[...] = ds
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready)
                plgpu.barrier_wait(k_ready.at[slot])
                dq = mma_acc(dq, ds, k_smem.at[slot, :, pl.ds(0, half)])
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            sweep_and_store(step, do_smem, 0)

    scratch = [
        mc.swizzled_smem((2, bq, half), dtype),
        mc.swizzled_smem((2, bq, half), dtype),
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        mc.swizzled_smem((bq, bkv), jnp.float32),
        mc.swizzled_smem((bq, bkv), dtype),
        plgpu.Barrier(num_barriers=CONSUMERS * 3),
        plgpu.Barrier(),
        plgpu.Barrier(),
        plgpu.Barrier(),
        plgpu.Barrier(),
        *kv_ring_scratch(cfg, D, dtype),
    ] + (segment_scratch(bq, stages, bkv) if spec.segments else [])
    return kernel_call(body, jax.ShapeDtypeStruct(q.shape, dtype), scratch, grid, names)(
        q, k, v, do, lse, delta, *segment_operands(segs, bq))
