"""Hopper (sm_90) block-sparse attention forward in Pallas Mosaic GPU, with
the Hopper backward (mosaic_gpu_backward.py) or the portable kernels'.

Built from the flash-attention kernels' pieces (attention/mosaic_gpu):
three warpgroups a block, two consumers doing the math with wgmma and a
producer streaming K and V through a ring of shared-memory slots by TMA.
A block owns 128 query rows that share one list row: 64 rows each
consumer, cut from the list row's rows (its query block, for each query
head the row serves: one, or the whole kv group with lists per kv head).
So the producer streams each listed K/V tile once for both consumers, and
with lists per kv head once for two query heads (block_q 64) or once per
64-row half of a query block (block_q 128); row sets larger than 128 rows
take several blocks, which re-read their tiles (from L2, mostly).

The producer reads the list row from GMEM and copies exactly the listed key
blocks; the consumers read the same indices for the key positions. Rows
are canonical (sorted, lists.canonical_lists), so the blocks that every row
sees in full come first (``lists.unmasked_prefix``, computed in XLA) and
run without the mask; the rest are masked (causal, segment ids, padding).
Online softmax in base 2, as the attention forward. The logsumexp it writes
feeds the Hopper backward (one fused dK/dV/dQ kernel over transposed lists)
or the portable dQ and dK/dV kernels (blockspec.backward, compiled through
Triton), as the caller asks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common as mc
from pallas_kernels.attention.mosaic_gpu.common import (CONSUMERS, LOG2E, Spec, kernel_call,
                                                        masked_logits, mma, mma_acc, sweep,
                                                        vector, zeros)
from pallas_kernels.attention.mosaic_gpu.rings import (Segments, kv_ring_scratch, ring_producer,
                                                       segment_scratch)
from pallas_kernels.attention.mosaic_gpu.schedule import block_order, block_position
from pallas_kernels.attention.tuning import KernelBlocks
from pallas_kernels.block_sparse_attention import blockspec, mosaic_gpu_backward
from pallas_kernels.block_sparse_attention.lists import unmasked_prefix
from pallas_kernels.block_sparse_attention.mosaic_gpu_backward import ROWS, supports_backward

STAGES = 2
# The Hopper backward's compiled tests pass (H200, jax 0.11.2), so
# implementation='pallas' (and 'auto' on a GPU) runs it behind the Hopper
# forward; False would keep the portable backward there.
BACKWARD_VERIFIED = True


def supports(q, k, v, *, block_q: int, block_k: int, list_heads: int) -> str | None:
    """None when the Hopper forward (and so the Hopper backward) takes this
    call, else why (the device is the dispatcher's to check)."""
    problem = supports_backward(q, k, v, block_q=block_q, block_k=block_k)
    if problem:
        return problem
    rows = block_q * (q.shape[2] // list_heads)  # query rows a list row serves
    if rows % (CONSUMERS * ROWS):
        return (f"a list row must serve a multiple of {CONSUMERS * ROWS} query rows (block_q "
                f"x query heads a list row serves = {rows})")
    return None


def forward(q, k, v, lists, segs, cfg):
    """Padded q [B,Sp,H,D], k/v [B,Tp,KH,D], lists (indices, counts,
    unmasked prefix), segs () or (q ids [B,Sp], kv ids [B,Tp]) -> (out
    [B,Sp,H,D], lse2 [B,H,Sp]: the base-2 logsumexp of the scaled logits,
    +inf on rows that see no key)."""
    B, Sp, H, D = q.shape
    G, LG, bq, bk = cfg.group, cfg.list_group, cfg.block_q, cfg.block_k
    HL = H // LG
    passes = LG * bq // (CONSUMERS * ROWS)  # blocks per list row
    tiles = (Sp // bq) * passes
    grid, names = block_order(B * HL, tiles)
    spec = Spec(q_len=cfg.q_len, kv_len=cfg.kv_len, causal=cfg.causal, window=None,
                scale=cfg.scale, blocks=None, segments=cfg.has_segments)
    ring_cfg = KernelBlocks(block_q=ROWS, block_kv=bk, stages=STAGES)
    c = spec.exp_scale
    dtype = q.dtype

    def body(q_ref, k_ref, v_ref, idx_ref, cnt_ref, full_ref, *refs):
        if cfg.has_segments:
            (q_ids, kv_ids), refs = refs[:2], refs[2:]
        o_ref, lse_ref, q_smem, lse_smem, q_ready, *ring = refs[:11]
        k_smem, v_smem, k_ready, v_ready, k_free, v_free = ring
        segments = Segments(q_ids, kv_ids, None, *refs[11:]) if cfg.has_segments else None
        b, hl, step = block_position(HL, grid)
        tile = tiles - 1 - step  # causal: the last query blocks list the most
        i, part = lax.div(tile, passes), lax.rem(tile, passes)
        count = cnt_ref[b, hl, i]
        wg = lax.axis_index("wg")

        @pl.when(wg == CONSUMERS)
        def _producer():
            def issue(n, slot):
                start = idx_ref[b, hl, i, n] * bk
                keys = (b, pl.ds(start, bk), lax.div(hl * LG, G))
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])
                if segments:
                    segments.fetch(b, start, bk, slot)
            ring_producer(count, STAGES, issue, (k_free, v_free),
                          (mc.PRODUCER_REGS, mc.CONSUMER_REGS))

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(mc.CONSUMER_REGS, action="increase")
            row = part * (CONSUMERS * ROWS) + wg * ROWS  # within the list row's row set
            h = hl * LG + lax.div(row, bq)
            row0 = i * bq + lax.rem(row, bq)
            my_q = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS), h], my_q, q_ready.at[wg])
            qs_v = segments.own(b, row0, ROWS, wg) if segments else None
            plgpu.barrier_wait(q_ready.at[wg])

            def step(n, carry, masked):
                acc, m, l = carry
                slot = lax.rem(n, STAGES)
                ks_v = segments.at(slot) if segments else None  # read before K's slot is freed
                plgpu.barrier_wait(k_ready.at[slot])
                s = mma(my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)), (ROWS, bk))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = masked_logits(spec, s, row0, idx_ref[b, hl, i, n], qs_v, ks_v)
                m_new = jnp.maximum(m, s.max(axis=1))
                # A row that has seen no key yet keeps m = -inf; subtract 0 then.
                m_scaled = (jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new) * c
                alpha = jnp.exp2(m * c - m_scaled)
                p = jnp.exp2(s * c - mc.rows(m_scaled, s.shape))
                l = l * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_ready.at[slot])
                acc = mma_acc(acc * mc.rows(alpha, acc.shape), p.astype(dtype), v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (zeros((ROWS, D)), vector(ROWS, -jnp.inf, 1), vector(ROWS, 0.0, 1))
            acc, m, l = sweep(step, 0, 0, full_ref[b, hl, i], count, carry)
            empty = l == 0.0
            l_safe = jnp.where(empty, 1.0, l)
            my_q[...] = (acc * mc.rows(1.0 / l_safe, acc.shape)).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m * c + jnp.log(l_safe) * LOG2E)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(row0, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, ROWS)])
            mc.wait_stores_before_exit()

    scratch = [
        mc.swizzled_smem((CONSUMERS, ROWS, D), dtype),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
        plgpu.Barrier(num_barriers=CONSUMERS),
        *kv_ring_scratch(ring_cfg, D, dtype),
    ] + (segment_scratch(ROWS, STAGES, bk) if cfg.has_segments else [])
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, Sp), jnp.float32))
    return kernel_call(body, out_type, scratch, grid, names)(q, k, v, *lists, *segs)


def _lists(idx, cnt, cfg):
    """The kernel's list operands: indices, counts and the unmasked prefix."""
    return idx, cnt, unmasked_prefix(idx, cnt, block_q=cfg.block_q, block_k=cfg.block_k,
                                     offset=cfg.kv_len - cfg.q_len, kv_len=cfg.kv_len,
                                     causal=cfg.causal, segments=cfg.has_segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, lists, segs, cfg, hopper_backward):
    return forward(q, k, v, _lists(*lists, cfg), segs, cfg)[0]


def _attention_fwd(q, k, v, lists, segs, cfg, hopper_backward):
    out, lse2 = forward(q, k, v, _lists(*lists, cfg), segs, cfg)
    return out, (q, k, v, lists, segs, out, lse2)


def _attention_bwd(cfg, hopper_backward, residuals, do):
    q, k, v, lists, segs, out, lse2 = residuals
    if hopper_backward:
        dq, dk, dv = mosaic_gpu_backward.backward(q, k, v, lists, segs, out, lse2, do, cfg)
    else:  # natural-log logsumexp (+inf rows stay +inf: p = 0)
        dq, dk, dv = blockspec.backward(q, k, v, lists, segs, out, lse2 / LOG2E, do, cfg)
    return dq, dk, dv, (None, None), tuple(None for _ in segs)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "softmax_scale",
                                             "hopper_backward"))
def mosaic_block_sparse_attention(q, k, v, block_indices, block_counts, segment_ids=None, *,
                                  block_q, block_k, causal=False, softmax_scale=None,
                                  hopper_backward=False):
    """Differentiable block-sparse attention: the Hopper forward, and the
    Hopper backward (``hopper_backward``) or the portable one compiled.
    Arguments as blockspec_block_sparse_attention's (lists canonical,
    ``supports`` satisfied, which the Hopper backward's conditions are part
    of)."""
    q_p, k_p, v_p, segs, cfg = blockspec.prepare(
        q, k, v, segment_ids, block_q=block_q, block_k=block_k, causal=causal,
        softmax_scale=softmax_scale, list_heads=block_indices.shape[1], interpret=False)
    out = _attention(q_p, k_p, v_p, (block_indices, block_counts), segs, cfg, hopper_backward)
    return out[:, :q.shape[1]]
