"""Hopper (sm_90) int4 weight-only matmul for decode batches, in Pallas Mosaic
GPU: streams the packed weights (packing.py layout) at memory bandwidth.

Decode is bound by reading the weights, so the product is computed
transposed, out^T [N, M] = W^T [N, K] @ x^T [K, M]: the weights fill the
wgmma's 64-row M side and the few activation rows its N side (8..64, a
multiple of 8), so no tensor-core work is spent on padding rows of x.

The packed bytes [N, K/2] are exactly a signed int4 array W^T [N, K], which
is what the kernel sees. Each block owns tn weight rows of W^T and every
split_k-th step of K, so the call is this one kernel: no partial sums,
transpose or cast in XLA. A TMA warpgroup streams, per step, the [tn, kt]
int4 codes, their group scales and the [m8, kt] slice of x; compute
warpgroups take the steps in turn (one warpgroup converting codes cannot keep
up with one SM's share of HBM bandwidth), each into its own accumulator, and
add them up in shared memory at the end. The codes go from shared memory
straight into registers, 8 per thread and 32-bit load, are moved into the
wgmma operand layout by a shuffle and byte-permutes, and Mosaic GPU converts
them to bf16 two at a time (a byte-permute, a LOP3 and a packed subtraction
per pair: the magic-number trick of packing.py, on 32-bit words); the wgmma
takes these integer-valued weights from registers, and each group's product
is scaled afterwards in float32 (see _multiply_step).

A block streams at a rate of its own (one SM's), so the kernel needs a block
on nearly every SM: N / tn blocks alone leave half of them idle at N=4096.
With split_k > 1 the split_k blocks of one tn slice form a cluster; blocks
1.. store their float32 partial sums into block 0's shared memory (an
asynchronous store to a peer block, completing on block 0's barrier), and
block 0 adds them and writes the output (see _sum_over_split).
A call without split_k takes default_split_k's split (from the shape and
the SM count): on an H100 at K=14336, N=4096 (a Llama-3-8B down
projection) it splits 2 ways, 15.7 us a call at batch 1 against 25 us
unsplit (72% of copy bandwidth), and at K=4096, N=14336 it does not split
(a second split there is slower). With
cluster > 1 the blocks of a cluster that take the same K steps share each x
step (one TMA multicast), cutting the L2 reads of x, which at batch 16 match
the weight bytes.

Supported: symmetric codes (no zero points), bf16 x with at most 64 rows
(the bf16 conversion is Mosaic GPU's fast path), group_size a multiple of 64.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels import mosaic_common as mc
from pallas_kernels.shapes import pad_to, round_up

MAX_ROWS = 64
CHUNK = 64  # K per wgmma: one 128-byte swizzled row of bf16 x
SMEM_LIMIT = mc.SMEM_PER_BLOCK - 1024  # 1 KB left for barriers
MAX_STAGES = 6  # the depth of the fastest measured configuration (H100, batch 16)
MAX_CLUSTER = 8  # blocks a cluster may hold without opting into non-portable sizes
# The default K split stays within 4 blocks a cluster: a cluster's blocks must
# be resident on one GPC at once, and at one block per SM four-block clusters
# still pack the 16-18 SMs of each H100/H200 GPC.
AUTO_MAX_SPLIT = 4


def _swizzled(dtype, minor: int):
    """Tiling and swizzle for a [rows, minor] block of dtype in shared memory."""
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits
    swizzle = plgpu.find_swizzle(bits * minor)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def unsupported(x, packed, zeros, group_size: int) -> str | None:
    """Why the Mosaic kernel cannot take these operands (None if it can)."""
    if zeros is not None:
        return "zero points (asymmetric codes) are not supported"
    if x.dtype != jnp.bfloat16:
        return f"x has dtype {x.dtype}; the kernel takes bfloat16"
    if x.shape[0] > MAX_ROWS:
        return f"x has {x.shape[0]} rows; the decode kernel takes at most {MAX_ROWS}"
    if group_size % CHUNK:
        return f"group_size={group_size} must be a multiple of {CHUNK}"
    if packed.shape[0] % 64:
        return f"N={packed.shape[0]} must be a multiple of 64 (wgmma rows)"
    return None


def default_block_k(k: int, group_size: int) -> int:
    """The largest step of 512, 256, 128 or 64 codes dividing K that holds
    whole groups or lies inside one (64 always does: group_size % 64 == 0)."""
    return next(b for b in (512, 256, 128, CHUNK)
                if k % b == 0 and (b % group_size == 0 or group_size % b == 0))


def _smem_bytes(m8: int, tn: int, kt: int, group_size: int, compute_wgs: int,
                split: int = 1):
    """Shared memory (per pipeline slot: codes, x, f32 scales; once: the
    output tile, the other warpgroups' f32 sums and, with a K split, the
    other blocks' f32 sums)."""
    step = tn * kt // 2 + m8 * kt * 2 + max(1, kt // group_size) * tn * 4
    return step, m8 * tn * 2 + (compute_wgs + split - 2) * tn * m8 * 4


def default_stages(m8: int, tn: int, kt: int, group_size: int, compute_wgs: int,
                   split: int = 1) -> int:
    """As many pipeline slots as fit in shared memory, at most MAX_STAGES."""
    step, once = _smem_bytes(m8, tn, kt, group_size, compute_wgs, split)
    return min(MAX_STAGES, (SMEM_LIMIT - once) // step)


def split_problem(k: int, block_k: int, split_k: int, cluster: int = 1) -> str | None:
    """Why K cannot be split over split_k blocks (None if it can): each block
    takes an equal whole number of block_k steps, and the split's blocks (times
    the x-sharing cluster) form one cluster."""
    if split_k < 1 or split_k * cluster > MAX_CLUSTER:
        return (f"split_k={split_k} must be >= 1 and, times cluster={cluster}, at most "
                f"{MAX_CLUSTER} (blocks of a cluster)")
    if (k // block_k) % split_k:
        return (f"split_k={split_k} must divide the {k // block_k} K steps of block_k={block_k} "
                f"(K={k})")
    return None


def default_split_k(m: int, n: int, k: int, group_size: int, *, block_n: int = 64,
                    block_k: int | None = None, compute_wgs: int = 3, cluster: int = 1,
                    sms: int | None = None) -> int:
    """The K split of a call: the largest split_k (at most AUTO_MAX_SPLIT
    blocks a cluster) that divides the K steps, keeps every block in one wave
    (N / block_n * split_k <= sms; sms: the device's, compat.sm_count) and
    leaves room for 2 pipeline slots. 1 where the N slices alone fill the SMs:
    a second wave would only add each block's start-up."""
    kt = block_k or default_block_k(k, group_size)
    sms = sms or compat.sm_count()
    m8 = round_up(m, 8)
    return max(s for s in range(1, AUTO_MAX_SPLIT // cluster + 1)
               if s == 1 or (split_problem(k, kt, s, cluster) is None
                             and n // block_n * s <= sms
                             and default_stages(m8, block_n, kt, group_size, compute_wgs, s) >= 2))


def _pieces(kt: int, group_size: int):
    """The step's runs of chunks that share one scale row; run p uses row p.
    A group each when the step holds whole groups, else the whole step (it
    lies inside one group)."""
    per = min(kt, group_size) // CHUNK
    return [range(p * per, (p + 1) * per) for p in range(kt // CHUNK // per)]


def _multiply_step(total, w_smem, x_smem, s_smem, *, group_size: int):
    """total [tn, m8] f32 + dequantised codes [tn, kt] @ x^T [kt, m8].

    The tensor cores take the integer codes as bf16 (exact) and each group's
    product is scaled once in f32 afterwards: a few multiplies per thread
    instead of one per weight, and no bf16 rounding of code * scale. The next
    group's codes are converted while its predecessor's wgmma runs. Returns
    with every wgmma done (the pipeline frees the slots when the step returns)."""
    tn, kt = w_smem.shape
    # 8 consecutive codes (32 bits) per thread and load; a shuffle and
    # byte-permutes move them into the wgmma operand layout.
    codes = plgpu.layout_cast(plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X),
                              plgpu.Layout.WGMMA)

    def convert(chunks):
        return [codes[:, i * CHUNK:(i + 1) * CHUNK].astype(jnp.bfloat16) for i in chunks]

    pieces = _pieces(kt, group_size)
    w_next = convert(pieces[0])
    for p, chunks in enumerate(pieces):
        w_now = w_next

        def product(acc_ref):  # run at once by run_scoped, inside this iteration
            for w, i in zip(w_now, chunks):
                plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(
                    x_smem.at[:, pl.ds(i * CHUNK, CHUNK)], (1, 0)))
            following = convert(pieces[p + 1]) if p + 1 < len(pieces) else []
            return acc_ref[...], following

        part, w_next = pl.run_scoped(product, plgpu.ACC(total.shape, jnp.float32))
        scale = plgpu.load(s_smem.at[p], (), layout=plgpu.Layout.WGMMA.reduce(1))
        total = total + part * lax.broadcast_in_dim(scale, total.shape, [0])
    return total


def _store_transposed(acc, out_smem, out_gmem, rows: int):
    """Write the f32 accumulator out^T [tn, m8] as out[:rows] ([rows, tn] in
    out_smem's dtype). WGMMA_TRANSPOSED holds the same values after one
    shuffle and stores through a transposed view of [m8, tn]."""
    out_t = plgpu.layout_cast(acc.astype(out_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
    # (.at[:] makes a view: jax 0.11's transpose_ref takes no bare ref)
    plgpu.transpose_ref(out_smem.at[:], (1, 0))[...] = out_t
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, rows)], out_gmem)
    mc.wait_stores_before_exit()


def _sum_over_split(part, incoming, received, done, store):
    """Block 0 of the K split stores (store(total)) the sum of the split's
    f32 partial sums part [tn, m8]; block i > 0 sends its part to slot i - 1
    of block 0's incoming buffer, an asynchronous store into the peer's shared
    memory that completes on block 0's received barrier. Every block then
    waits on the cluster barrier done, which block 0 passes once it has
    received them all: a block's shared memory (its barriers included) must
    outlive its peers' accesses to it."""
    i = lax.axis_index("split")

    @pl.when(i > 0)
    def _():
        plgpu.async_store_smem(part, incoming.at[i - 1], received, cluster_idx=0,
                               cluster_dim="split")
        plgpu.barrier_arrive(done)
        plgpu.barrier_wait(done)

    @pl.when(i == 0)
    def _():
        plgpu.barrier_wait(received)
        plgpu.barrier_arrive(done)
        total = part
        for s in range(incoming.shape[0]):
            total += plgpu.load(incoming.at[s], (), layout=plgpu.Layout.WGMMA)
        store(total)
        plgpu.barrier_wait(done)


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "block_k", "stages",
                                             "compute_wgs", "cluster", "split_k"))
def int4_weight_only_mosaic(x, packed, scales, *, group_size: int, block_n: int = 64,
                            block_k: int | None = None, stages: int | None = None,
                            compute_wgs: int = 3,
                            cluster: int = 1, split_k: int | None = None):
    """x [M, K] bf16 @ dequantised int4 weights (packed [N, K/2], scales
    [K/g, N]) -> [M, N] bf16; see reference.int4_weight_only_reference.
    block_n weight rows of W^T and block_k codes of K per step (None: the
    largest of 512..64 that fits K and the groups); stages pipeline slots
    (None: default_stages). split_k blocks, a cluster, share each block_n
    slice's K (None: default_split_k's). compute_wgs warpgroups (2 or 3) take
    the steps in turn; cluster (1 or 2) blocks share each x step through TMA
    multicast."""
    why = unsupported(x, packed, None, group_size)
    if why:
        raise ValueError(f"the Mosaic GPU int4 kernel cannot run this call: {why}")
    M, K = x.shape
    N, half = packed.shape
    g = group_size
    tn, kt = block_n, block_k or default_block_k(K, g)
    if tn not in (64, 128, 256) or N % tn:
        raise ValueError(f"block_n={tn} must be 64, 128 or 256 and divide N={N}")
    if kt % CHUNK or (kt % g and g % kt) or K % kt:
        raise ValueError(f"block_k={kt} must be a multiple of {CHUNK} dividing K={K}, and a "
                         f"multiple or divisor of group_size={g}")
    # Not 4: a block of 5 warpgroups launches with at most 96 registers a
    # thread, fewer than the pipeline's register split then asks for, so the
    # compute warpgroups' register increase never returns (it hung on the H200).
    if compute_wgs not in (2, 3):
        raise ValueError(f"compute_wgs={compute_wgs} must be 2 or 3")
    if cluster not in (1, 2) or N % (cluster * tn):
        raise ValueError(f"cluster={cluster} must be 1 or 2, with cluster * block_n "
                         f"dividing N={N}")
    split = split_k or default_split_k(M, N, K, g, block_n=tn, block_k=kt,
                                       compute_wgs=compute_wgs, cluster=cluster)
    why = split_problem(K, kt, split, cluster)
    if why:
        raise ValueError(why)
    # x's block has m8 rows (the wgmma's N side); TMA fills rows past M with
    # zeros, and the columns of out^T they make are never stored. TMA takes
    # such a partial block only from an array of fewer than 8 rows: larger
    # ragged batches are padded (one small XLA op).
    m8 = round_up(M, 8)
    slots = stages or default_stages(m8, tn, kt, g, compute_wgs, split)
    step_bytes, once_bytes = _smem_bytes(m8, tn, kt, g, compute_wgs, split)
    if slots < 1 or slots * step_bytes + once_bytes > SMEM_LIMIT:
        raise ValueError(f"stages={slots} must be >= 1 and, at {step_bytes} bytes a slot plus "
                         f"{once_bytes}, fit {SMEM_LIMIT} bytes of shared memory (block_n={tn}, "
                         f"block_k={kt}, split_k={split}, {m8} rows of x)")
    # TMA multicast splits x's block along its first dimension of 8-row
    # tiles of more than one (the 64-column tiles at m8 == 8).
    tiles = m8 // 8 if m8 > 8 else kt // CHUNK
    if tiles % cluster:
        raise ValueError(f"cluster={cluster} must divide the {tiles} tiles of x's block "
                         f"({m8} rows padded from M={M}, block_k={kt})")
    xp = x if M < 8 else pad_to(x, (m8, K))
    # The same bytes as int4 W^T [N, K] (the low nibble is the even k).
    w_t = lax.bitcast_convert_type(packed, jnp.int4).reshape(N, K)
    scale_rows = max(1, kt // g)  # group scale rows per step
    x_axes = ("cluster",) if cluster > 1 else ()
    steps = K // kt // split  # K steps of each block

    def body(x_ref, w_ref, s_ref, out_ref, out_smem, partial_smem, partial_done, *split_refs):
        wg = lax.axis_index("wg")
        j = lax.axis_index("n")
        if cluster > 1:
            j = j * cluster + lax.axis_index("cluster")
        if split > 1:
            # Block i of the split takes K steps i, i + split, ...: all blocks
            # walk K together, as without a split (blocks started at staggered
            # K steps ran up to 12 us slower), and a cluster reads each weight
            # row's split * kt codes at once.
            rank = lax.axis_index("split")
            k_step = lambda s: s * split + rank  # noqa: E731
        else:
            k_step = lambda s: s  # noqa: E731

        def step(indices, w_smem, x_smem, s_smem, total):
            return lax.cond(indices[0] % compute_wgs == wg,
                            lambda t: _multiply_step(t, w_smem, x_smem, s_smem, group_size=g),
                            lambda t: t, total)

        def compute(run_pipeline):
            total = run_pipeline(plgpu.layout_cast(jnp.zeros((tn, m8), jnp.float32),
                                                   plgpu.Layout.WGMMA))

            # Warpgroups 1.. hand their sums to warpgroup 0, which writes out.
            @pl.when(wg > 0)
            def _():
                partial_smem.at[wg - 1][...] = total
                plgpu.barrier_arrive(partial_done)

            @pl.when(wg == 0)
            def _():
                plgpu.barrier_wait(partial_done)
                out = total
                for i in range(compute_wgs - 1):
                    out += plgpu.load(partial_smem.at[i], (), layout=plgpu.Layout.WGMMA)
                if split > 1:
                    _sum_over_split(out, *split_refs, store=lambda t: _store_transposed(
                        t, out_smem, out_ref.at[:, pl.ds(j * tn, tn)], M))
                else:
                    _store_transposed(out, out_smem, out_ref.at[:, pl.ds(j * tn, tn)], M)

        plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps,), memory_registers=40, wg_axis="wg",
            num_compute_wgs=compute_wgs, max_concurrent_steps=slots, compute_context=compute,
            in_specs=[
                plgpu.BlockSpec((tn, kt), lambda s: (j, k_step(s)),
                                transforms=_swizzled(jnp.int4, kt)),
                plgpu.BlockSpec((m8, kt), lambda s: (0, k_step(s)),
                                transforms=_swizzled(jnp.bfloat16, kt), collective_axes=x_axes),
                plgpu.BlockSpec((scale_rows, tn),
                                lambda s: (k_step(s) * kt // (g * scale_rows), j)),
            ],
        )(w_ref, x_ref, s_ref)

    scratch = [plgpu.SMEM((m8, tn), x.dtype),
               plgpu.SMEM((compute_wgs - 1, tn, m8), jnp.float32,
                          transforms=_swizzled(jnp.float32, m8)),
               plgpu.Barrier(num_arrivals=compute_wgs - 1)]
    if split > 1:  # the other blocks' sums (block 0), their arrival, the exit
        scratch += [plgpu.SMEM((split - 1, tn, m8), jnp.float32,
                               transforms=_swizzled(jnp.float32, m8)),
                    plgpu.Barrier(num_arrivals=split - 1),
                    plgpu.ClusterBarrier(collective_axes=("split",))]
    # The cluster's axes: x-sharing blocks (N slices), then the K split.
    axes = [(size, name) for size, name in ((cluster, "cluster"), (split, "split")) if size > 1]
    clusters = dict(cluster=tuple(a[0] for a in axes),
                    cluster_names=tuple(a[1] for a in axes)) if axes else {}
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((M, N), x.dtype), scratch_types=scratch,
        grid=(N // tn // cluster,), grid_names=("n",), num_threads=compute_wgs + 1,
        thread_name="wg", compiler_params=plgpu.CompilerParams(), **clusters,
    )(xp, w_t, scales.astype(jnp.float32))
