"""Backward kernels over keys: dK and dV (and, fused, dQ), key-parallel.

A block owns key rows and accumulates dK and dV over the query blocks of
every head of its kv group (no atomics, no per-head copies). With
``dq_acc`` the same kernel forms dQ too: the consumers share their dS^T
tiles through shared memory and the TMA unit reduce-adds float32 partial dQ
tiles (5 matrix products per step instead of the 7 of separate dQ and dK/dV
kernels). At head_dim 256 one consumer cannot hold both the dK and dV
accumulators, so ``backward_dkv_roles`` gives both consumers the same keys
and splits each step by role.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention.mosaic_gpu.common import (BWD_REGS, CONSUMERS, FUSED_REGS, Spec,
                                                        iota, kernel_call, mma, mma_acc, sweep,
                                                        zeros)
from pallas_kernels.attention.mosaic_gpu.rings import (key_segments, key_tile,
                                                       query_ring_barriers, query_ring_slots,
                                                       segment_operands, segment_scratch)
from pallas_kernels.attention.mosaic_gpu.schedule import block_order

# Fused backward: dS^T tiles alternate between two shared-memory buffers, so
# one barrier per step keeps a consumer from overwriting a tile the other is
# still reading (it reads step t's before it can arrive for step t + 1).
_DS_BUFFERS = 2


def _probs_t(spec, st, masked, lse_slot, i, key0, segs, slot, ks_v, listed=None):
    """P^T = exp2(S^T - lse) of a key-parallel tile of base-2 logits st [keys,
    queries] (query block i, keys from key0), masked where ``masked``; with
    segs, ring slot ``slot`` holds the query block's ids and ks_v the keys'.
    ``listed`` False zeroes the tile: a -inf bias, because a select on a
    whole tile by a scalar predicate does not lower, and multiplying by 0
    would turn the overflow of keys absent from lse into NaN."""
    if masked:
        seg = ()
        if segs:
            qs_v = segs.at(slot)
            seg = (mc.cols(qs_v, st.shape), mc.rows(ks_v, st.shape))
        ok = spec.mask(iota(st.shape, 1) + (i * st.shape[1] + spec.offset),
                       iota(st.shape, 0) + key0, *seg)
        st = jnp.where(ok, st, -jnp.inf)
    if listed is not None:
        st = st + jnp.where(listed, 0.0, -jnp.inf)
    lse_v = plgpu.load(lse_slot, (), layout=plgpu.Layout.WGMMA.reduce(0))
    return jnp.exp2(st - mc.cols(lse_v, st.shape))


@dataclasses.dataclass(frozen=True)
class KeyVisits:
    """The query tiles a key-parallel block visits, where a list decides them
    (block-sparse attention) instead of the mask's block ranges.

    operands: extra kernel inputs, after the segment ids; their refs come first
    in ``start(refs, spec, grid, KH, G, cols, cfg, inputs, ring, segs, regs,
    with_delta)`` (the other arguments as ``rings.key_tile``'s), which runs the
    producer and returns (tile, visit): tile has b, kvh, wg and c0 as a
    ``KeyTile``; visit(step, carry) runs step(i, t, g, carry, masked, listed)
    over this consumer's tiles: bq-row query tile i of head g of the kv group
    at ring step t, listed None or a traced bool (False: this consumer's keys
    are not listed for the tile, which adds nothing)."""
    operands: tuple
    start: Callable


def _visit_range(spec, G, tile, step, carry):
    """The query blocks of ``tile.blocks`` for each head of the kv group, masked
    where the mask cuts them."""
    lo = tile.blocks[0]

    def head(g, carry):
        def at(i, carry, masked):
            return step(i, g * tile.per_head + (i - lo), g, carry, masked)
        return sweep(at, *spec.sweep_blocks(*tile.blocks), carry)
    return lax.fori_loop(0, G, head, carry)


def _key_parallel_shape(q, k):
    """(batch, head_dim, kv heads, query heads per kv head) of a backward call."""
    return q.shape[0], q.shape[3], k.shape[2], q.shape[2] // k.shape[2]


def backward_dkv(q, k, v, do, lse, delta, segs, spec: Spec, want_dk=True, want_dv=True,
                 dq_acc=None, visits: KeyVisits | None = None):
    """dK, dV for k/v [B,Tp,KH,D] (None where not wanted). A block owns
    CONSUMERS * block_kv keys and visits the query blocks the mask lets them
    see, or those ``visits`` names.

    With ``dq_acc`` (a float32 [B,Sp,H,D] ``jax.new_ref`` of zeros) the kernel
    also adds dQ/scale into it, so no second pass recomputes S and dP (5
    matrix products per step instead of 7). Each step's dS^T tiles of both
    consumers go to shared memory; consumer w then forms the partial dQ of
    head-dim columns [w*D/2, (w+1)*D/2) over the block's keys, and the TMA
    unit reduce-adds it (float32) into dq_acc."""
    B, D, KH, G = _key_parallel_shape(q, k)
    cfg = spec.blocks.dkv
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    grid, names = block_order(B * KH, k.shape[1] // (CONSUMERS * bkv))
    dtype = q.dtype
    need_v = want_dk  # dP = dO V^T feeds only dK (and dQ)
    fused = dq_acc is not None
    regs = FUSED_REGS if fused else BWD_REGS
    # Fused dQ work split: at head_dim 128 each consumer forms half of dQ's
    # columns every step; a 32-column half of a 64-wide tile is no wgmma
    # operand, so at 64 the consumers take whole dQ tiles on alternate steps.
    split_cols = D == 128
    dq_cols = D // CONSUMERS if split_cols else D
    assert not fused or (want_dk and D in (64, 128)), "checked by mosaic_flash_attention"

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        segs, refs = key_segments(spec, refs)
        if visits:
            visit_refs, refs = refs[:len(visits.operands)], refs[len(visits.operands):]
        if fused:
            dq_ref, refs = refs[0], refs[1:]
        n_out = want_dk + want_dv
        outs, refs = refs[:n_out], refs[n_out:]
        (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
         own_ready, q_ready, do_ready, lse_ready, delta_ready, q_free, do_free) = refs[:13]
        if fused:
            ds_smem, dq_smem, ds_ready, dq_done = refs[13:17]
        dk_ref = outs[0] if want_dk else None
        dv_ref = outs[-1] if want_dv else None
        tile_args = (
            spec, grid, KH, G, CONSUMERS * bkv, cfg, (q_ref, do_ref, lse_ref, delta_ref),
            (q_smem, do_smem, lse_smem, delta_smem, q_ready, do_ready, lse_ready, delta_ready,
             q_free, do_free), segs, regs)
        if visits:
            tile, visit = visits.start(visit_refs, *tile_args, with_delta=want_dk)
        else:
            tile = key_tile(*tile_args, with_delta=want_dk)
            visit = functools.partial(_visit_range, spec, G, tile)
        b, kvh, wg = tile.b, tile.kvh, tile.wg

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(regs[1], action="increase")
            key0 = tile.c0 + wg * bkv
            keys = (b, pl.ds(key0, bkv), kvh)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[keys], my_k, own_ready.at[2 * wg])
            if need_v:
                plgpu.copy_gmem_to_smem(v_ref.at[keys], my_v, own_ready.at[2 * wg + 1])
            plgpu.barrier_wait(own_ready.at[2 * wg])
            if need_v:
                plgpu.barrier_wait(own_ready.at[2 * wg + 1])
            if fused:  # dQ reads the other consumer's keys too
                plgpu.barrier_wait(own_ready.at[2 * (1 - wg)])
            ks_v = segs.own(b, key0, bkv, wg) if segs else None
            col_layout = plgpu.Layout.WGMMA.reduce(0)

            cols = pl.ds(wg * dq_cols if split_cols else 0, dq_cols)

            def dk_and_dq(dk, dst, q_slot, t, i, h):
                """dK += dS^T Q; once both consumers' dS^T tiles of step t are
                in shared memory, this consumer's dQ columns (or, at head_dim
                64, every other step's whole dQ tile), reduce-added."""
                buf = lax.rem(t, _DS_BUFFERS)
                ds_smem.at[buf, wg][...] = dst
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[buf])

                def with_dq(dk):
                    def products(refs):  # dK in flight while waiting for the other dS^T
                        plgpu.wgmma(refs[0], dst, q_slot)
                        plgpu.barrier_wait(ds_ready.at[buf])
                        for u in range(CONSUMERS):
                            plgpu.wgmma(refs[1], plgpu.transpose_ref(ds_smem.at[buf, u], (1, 0)),
                                        k_smem.at[u, :, cols])
                    dk, dq = pl.run_state(products)((plgpu.ACC.init(dk),
                                                     plgpu.ACC.init(zeros((bq, dq_cols)))))
                    my_dq = dq_smem.at[wg]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last add has read it
                    my_dq[...] = dq
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(my_dq, dq_ref.at[b, pl.ds(i * bq, bq), h, cols],
                                            reduction_op="add")
                    return dk

                if split_cols:
                    return with_dq(dk)

                def dk_only(dk):
                    dk = mma_acc(dk, dst, q_slot)
                    plgpu.barrier_wait(ds_ready.at[buf])  # every phase, as the other consumer
                    return dk
                return lax.cond(lax.rem(t, CONSUMERS) == wg, with_dq, dk_only, dk)

            def step(i, t, g, carry, masked, listed=None):
                dk, dv = carry
                slot = lax.rem(t, stages)
                q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])
                st, dcap = spec.base2_logits(
                    mma(my_k, plgpu.transpose_ref(q_slot, (1, 0)), (bkv, bq)))
                pt = _probs_t(spec, st, masked, lse_smem.at[slot], i, key0, segs, slot, ks_v,
                              listed)
                plgpu.barrier_wait(do_ready.at[slot])
                if not want_dk:
                    dv = mma_acc(dv, pt.astype(dtype), do_slot)
                    plgpu.barrier_arrive(do_free.at[slot])
                    plgpu.barrier_arrive(q_free.at[slot])
                    return dk, dv

                def dpt_and_dv(refs):  # both in flight, one wait
                    plgpu.wgmma(refs[0], my_v, plgpu.transpose_ref(do_slot, (1, 0)))
                    if want_dv:
                        plgpu.wgmma(refs[1], pt.astype(dtype), do_slot)
                accs = (zeros((bkv, bq)),) + ((dv,) if want_dv else ())
                dpt, *dv_new = pl.run_state(dpt_and_dv)(tuple(map(plgpu.ACC.init, accs)))
                dv = dv_new[0] if want_dv else None
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_wait(delta_ready.at[slot])
                delta_v = plgpu.load(delta_smem.at[slot], (), layout=col_layout)
                dst = pt * (dpt - mc.cols(delta_v, dpt.shape))
                dst = (dst if dcap is None else dst * dcap).astype(dtype)
                if fused:
                    dk = dk_and_dq(dk, dst, q_slot, t, i, kvh * G + g)
                else:
                    dk = mma_acc(dk, dst, q_slot)
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            zero = zeros((bkv, D))
            dk, dv = visit(step, (zero if want_dk else None, zero if want_dv else None))
            if fused:  # the other consumer may still read my K for its dQ
                plgpu.barrier_arrive(dq_done)
                plgpu.barrier_wait(dq_done)
            if want_dk:
                my_k[...] = (dk * spec.scale).astype(dtype)
            if want_dv:
                my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            if want_dk:
                plgpu.copy_smem_to_gmem(my_k, dk_ref.at[keys])
            if want_dv:
                plgpu.copy_smem_to_gmem(my_v, dv_ref.at[keys])
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((CONSUMERS, bkv, D), dtype),
        mc.swizzled_smem((CONSUMERS, bkv, D), dtype),
        *query_ring_slots(stages, bq, D, dtype),
        plgpu.Barrier(num_barriers=CONSUMERS * 2),
        *query_ring_barriers(stages),
    ]
    if fused:
        scratch += [
            mc.swizzled_smem((_DS_BUFFERS, CONSUMERS, bkv, bq), dtype),
            mc.swizzled_smem((CONSUMERS, bq, dq_cols), jnp.float32),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=_DS_BUFFERS),
            plgpu.Barrier(num_arrivals=CONSUMERS),
        ]
    if spec.segments:
        scratch += segment_scratch(bkv, stages, bq)
    out_type = [jax.ShapeDtypeStruct(k.shape, dtype)] * (want_dk + want_dv)
    seg_args = segment_operands(segs, CONSUMERS * bkv, key_parallel=True)
    args = (q, k, v, do, lse, delta, *seg_args, *(visits.operands if visits else ()))
    args += (dq_acc,) if fused else ()
    outs = kernel_call(body, out_type, scratch, grid, names)(*args)
    return (outs[0] if want_dk else None), (outs[-1] if want_dv else None)


def backward_dkv_roles(q, k, v, do, lse, delta, segs, spec: Spec):
    """dK, dV for head_dim 256, where one consumer cannot hold both
    accumulators (64x256 float32: 128 registers a thread each).

    The consumers share a block's block_kv keys and split each step by role:
    consumer 1 forms P^T = exp(S^T - lse) and dV += P^T dO; consumer 0 forms
    dP^T = V dO^T, takes P^T (times the soft-cap's derivative) from consumer 1
    through shared memory, and dK += dS^T Q. Two matrix products a step each,
    four in all, where separate dK and dV passes take five and stream Q and
    dO twice."""
    B, D, KH, G = _key_parallel_shape(q, k)
    cfg = spec.blocks.dkv
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    assert (bq, bkv) == (64, 64), "checked by mosaic_flash_attention"
    grid, names = block_order(B * KH, k.shape[1] // bkv)
    dtype = q.dtype
    ds_side, p_side = 0, 1  # consumer warpgroups by role

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        segs, refs = key_segments(spec, refs)
        (dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, p_smem,
         own_ready, q_ready, do_ready, lse_ready, delta_ready, q_free, do_free,
         p_ready, p_free) = refs[:18]
        tile = key_tile(
            spec, grid, KH, G, bkv, cfg, (q_ref, do_ref, lse_ref, delta_ref),
            (q_smem, do_smem, lse_smem, delta_smem, q_ready, do_ready, lse_ready, delta_ready,
             q_free, do_free), segs, BWD_REGS)
        b, wg, per_head, lo, key0 = tile.b, tile.wg, tile.per_head, tile.blocks[0], tile.c0
        keys = (b, pl.ds(key0, bkv), tile.kvh)

        col_layout = plgpu.Layout.WGMMA.reduce(0)

        def over_heads(step, acc):
            def head(g, acc):
                return sweep(functools.partial(step, g=g), *spec.sweep_blocks(*tile.blocks),
                             acc)
            return lax.fori_loop(0, G, head, acc)

        def store(acc, own_smem, out_ref):
            """Write a [bkv, D] result through this consumer's own (no longer
            read) K or V tile."""
            own_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(own_smem, out_ref.at[keys])
            mc.wait_stores_before_exit()

        @pl.when(wg == p_side)
        def _p_side():
            plgpu.set_max_registers(BWD_REGS[1], action="increase")
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, own_ready.at[p_side])
            plgpu.barrier_wait(own_ready.at[p_side])
            ks_v = segs.own(b, key0, bkv, p_side) if segs else None

            def step(i, dv, g, masked):
                slot = lax.rem(g * per_head + (i - lo), stages)
                q_slot = q_smem.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])
                st, dcap = spec.base2_logits(
                    mma(k_smem, plgpu.transpose_ref(q_slot, (1, 0)), (bkv, bq)))
                plgpu.barrier_arrive(q_free.at[slot])
                pt = _probs_t(spec, st, masked, lse_smem.at[slot], i, key0, segs, slot, ks_v)
                plgpu.barrier_wait(p_free)
                p_smem[...] = pt if dcap is None else pt * dcap
                plgpu.barrier_arrive(p_ready)
                plgpu.barrier_wait(do_ready.at[slot])
                dv = mma_acc(dv, pt.astype(dtype), do_smem.at[slot])
                plgpu.barrier_arrive(do_free.at[slot])
                return dv

            store(over_heads(step, zeros((bkv, D))), k_smem, dv_ref)

        @pl.when(wg == ds_side)
        def _ds_side():
            plgpu.set_max_registers(BWD_REGS[1], action="increase")
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, own_ready.at[ds_side])
            plgpu.barrier_wait(own_ready.at[ds_side])
            plgpu.barrier_arrive(p_free)  # the P^T tile starts free

            def step(i, dk, g, masked):
                del masked  # P^T comes masked
                slot = lax.rem(g * per_head + (i - lo), stages)
                do_slot = do_smem.at[slot]
                plgpu.barrier_wait(do_ready.at[slot])
                dpt = mma(v_smem, plgpu.transpose_ref(do_slot, (1, 0)), (bkv, bq))
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_wait(delta_ready.at[slot])
                delta_v = plgpu.load(delta_smem.at[slot], (), layout=col_layout)
                plgpu.barrier_wait(p_ready)
                pt = p_smem[...]
                plgpu.barrier_arrive(p_free)
                dst = (pt * (dpt - mc.cols(delta_v, dpt.shape))).astype(dtype)
                plgpu.barrier_wait(q_ready.at[slot])
                dk = mma_acc(dk, dst, q_smem.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                return dk

            store(over_heads(step, zeros((bkv, D))) * spec.scale, v_smem, dk_ref)

    scratch = [
        mc.swizzled_smem((bkv, D), dtype),
        mc.swizzled_smem((bkv, D), dtype),
        *query_ring_slots(stages, bq, D, dtype),
        mc.swizzled_smem((bkv, bq), jnp.float32),
        plgpu.Barrier(num_barriers=CONSUMERS),
        *query_ring_barriers(stages),
        plgpu.Barrier(),
        plgpu.Barrier(),
    ]
    if spec.segments:
        scratch += segment_scratch(bkv, stages, bq)
    out_type = [jax.ShapeDtypeStruct(k.shape, dtype)] * 2
    seg_args = segment_operands(segs, bkv, key_parallel=True)
    dk, dv = kernel_call(body, out_type, scratch, grid, names)(q, k, v, do, lse, delta, *seg_args)
    return dk, dv
