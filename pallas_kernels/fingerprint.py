"""Fingerprints of the Mosaic GPU kernels a call lowers to: a way to show, on a
machine without a GPU, that a refactor left the kernels unchanged.

    python -m pallas_kernels.fingerprint     # one line per standard case

Each Mosaic GPU custom call carries its kernel as an MLIR module in bytecode,
source locations included, so moving a line changes its bytes. The module is
parsed back, printed without debug information and hashed: equal fingerprints
before and after a change mean the GPU gets the same kernels. (This reads
jax-internal MLIR bindings, present in jax 0.10 and 0.11.)
"""
from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp


def kernel_modules(fn, *args) -> list[str]:
    """The Mosaic GPU kernel modules of jit(fn)(*args) lowered for CUDA, as text
    without locations, in program order."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import dialect

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    blobs = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    attrs = inner.attributes
                    if (inner.operation.name == "stablehlo.custom_call"
                            and "mosaic_gpu" in str(attrs["call_target_name"])):
                        config = ir.DictAttr(attrs["mhlo.backend_config"])
                        blobs.append(ir.StringAttr(config["module"]).value_bytes)
                    walk(inner.operation)
    walk(module.operation)
    ctx = jax_mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True  # the serialisation dialect of newer Mosaic GPU
    dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    with ctx:
        return [ir.Module.parse(b).operation.get_asm(enable_debug_info=False) for b in blobs]


def fingerprints(fn, *args) -> list[str]:
    """Short hashes of kernel_modules(fn, *args)."""
    return [hashlib.sha1(text.encode()).hexdigest()[:12] for text in kernel_modules(fn, *args)]


def _attention_case(S, T, H, KH, D, **kwargs):
    from pallas_kernels.attention.mosaic_gpu import mosaic_flash_attention
    q = jnp.ones((1, S, H, D), jnp.bfloat16)
    k = jnp.ones((1, T, KH, D), jnp.bfloat16)

    def forward_and_backward(q, k, v, do):
        out, vjp = jax.vjp(lambda *a: mosaic_flash_attention(*a, **kwargs), q, k, v)
        return out, *vjp(do)
    return forward_and_backward, (q, k, k, q)


def _decode_case(T, H, KH, D, S, fmt=None, page_size=None, **kwargs):
    """Decode attention over a bf16 (or ``fmt``-quantized) cache of S slots
    per sequence, contiguous or in pages of ``page_size``."""
    from pallas_kernels.decode_attention.kv_formats import quantize_kv
    from pallas_kernels.decode_attention.mosaic_gpu import mosaic_decode_attention
    B = 2
    q = jnp.ones((B, T, H, D), jnp.bfloat16)
    cache = jnp.ones((B * S // page_size, page_size, KH, D) if page_size else (B, S, KH, D),
                     jnp.bfloat16)
    k = quantize_kv(cache, fmt) if fmt else cache
    table = jnp.arange(B * S // page_size, dtype=jnp.int32).reshape(B, -1) if page_size else None
    lengths = jnp.full((B,), S, jnp.int32)
    return (lambda q, k, lengths, table: mosaic_decode_attention(q, k, k, lengths, table, **kwargs),
            (q, k, lengths, table))


def _block_sparse_case(S, H, KH, D, list_heads, block_q, block_k, segments=False, **kwargs):
    """The Hopper block-sparse forward over two listed key blocks a row (the
    backward is the portable kernels', not Mosaic GPU)."""
    from pallas_kernels.block_sparse_attention.mosaic_gpu import mosaic_block_sparse_attention
    q = jnp.ones((1, S, H, D), jnp.bfloat16)
    k = jnp.ones((1, S, KH, D), jnp.bfloat16)
    n_q = -(-S // block_q)
    indices = jnp.zeros((1, list_heads, n_q, 2), jnp.int32).at[..., 1].set(1)
    counts = jnp.full((1, list_heads, n_q), 2, jnp.int32)
    ids = (jnp.zeros((1, S), jnp.int32),) * 2 if segments else None
    return (lambda q, k, indices, counts: mosaic_block_sparse_attention(
        q, k, k, indices, counts, ids, block_q=block_q, block_k=block_k, **kwargs),
        (q, k, indices, counts))


def _block_sparse_backward_case(*args, **kwargs):
    """The Hopper block-sparse forward and backward (two kernels) of
    ``_block_sparse_case``'s problem."""
    forward, (q, k, indices, counts) = _block_sparse_case(*args, hopper_backward=True, **kwargs)

    def forward_and_backward(q, k, indices, counts):
        out, vjp = jax.vjp(lambda q, k: forward(q, k, indices, counts), q, k)
        return out, *vjp(out)
    return forward_and_backward, (q, k, indices, counts)


def _grouped_matmul_case(kernels, pingpong=False, k=200, n=136):
    """gmm, gmm with a transposed rhs (its d-lhs) and tgmm (its d-rhs) of a
    grouped-matmul kernel module, at their default tilings, bf16; pingpong:
    the two-consumer gmms in ping-pong (and no tgmm: it has no such schedule).
    The default N (136) leaves a partial last N tile; n=512 has none."""
    lhs, rhs = jnp.ones((300, k), jnp.bfloat16), jnp.ones((4, k, n), jnp.bfloat16)
    sizes, dout = jnp.asarray([100, 0, 150, 20], jnp.int32), jnp.ones((300, n), jnp.bfloat16)
    extra = dict(pingpong=True) if pingpong else {}

    def gmm_and_gradients(lhs, rhs, sizes, dout):
        out = (kernels.gmm(lhs, rhs, sizes, out_dtype=jnp.bfloat16, **extra),
               kernels.gmm(dout, rhs, sizes, transpose_rhs=True, out_dtype=jnp.bfloat16, **extra))
        return out if pingpong else (*out, kernels.tgmm(lhs, dout, sizes, out_dtype=jnp.bfloat16))
    return gmm_and_gradients, (lhs, rhs, sizes, dout)


def _cases():
    """name -> (fn, args): every Hopper kernel variant of the repository."""
    from pallas_kernels.attention import tuning
    from pallas_kernels.grouped_matmul import mosaic_gpu as gmm_kernels
    from pallas_kernels.grouped_matmul import two_consumers
    from pallas_kernels.quant_matmul import int4_mosaic_gpu, mosaic_gpu
    from pallas_kernels.quant_matmul.packing import pack_int4
    ids = jnp.zeros((1, 300), jnp.int32)
    fused = tuning.DEFAULTS[128]
    x = jnp.ones((16, 1024), jnp.bfloat16)
    packed = pack_int4(jnp.ones((1024, 512), jnp.int32))
    xq, wq = jnp.ones((256, 512), jnp.int8), jnp.ones((384, 512), jnp.int8)
    xf, wf = xq.astype(jnp.float8_e4m3fn), wq.astype(jnp.float8_e4m3fn)
    return {
        "attention causal d128 two kernels": _attention_case(
            300, 300, 4, 2, 128, causal=True,
            block_sizes=dataclasses.replace(fused, backward="two_kernels")),
        "attention full d128 fused": _attention_case(300, 300, 4, 2, 128, block_sizes=fused),
        "attention window d64 fused": _attention_case(300, 300, 2, 2, 64, sliding_window=50),
        "attention causal d64 two kernels": _attention_case(
            300, 300, 2, 2, 64, causal=True,
            block_sizes=dataclasses.replace(tuning.DEFAULTS[64], backward="two_kernels")),
        "attention causal d256 softcap segments": _attention_case(
            300, 300, 2, 1, 256, causal=True, logit_softcap=3.0, segment_ids=(ids, ids)),
        "attention causal d128 fused softcap segments": _attention_case(
            300, 300, 4, 2, 128, causal=True, logit_softcap=2.5, segment_ids=(ids, ids),
            block_sizes=fused),
        "attention causal d128 fused dv_pass": _attention_case(
            300, 300, 4, 2, 128, causal=True,
            block_sizes=dataclasses.replace(fused, backward="fused_dv_pass")),
        "int4 weight-only": (
            lambda x, p, s: int4_mosaic_gpu.int4_weight_only_mosaic(x, p, s, group_size=128,
                                                                    split_k=1),
            (x, packed, jnp.ones((8, 512), jnp.float32))),
        "int4 weight-only K split 2": (
            lambda x, p, s: int4_mosaic_gpu.int4_weight_only_mosaic(x, p, s, group_size=128,
                                                                    split_k=2),
            (x, packed, jnp.ones((8, 512), jnp.float32))),
        "w8a8": (mosaic_gpu.w8a8_mosaic, (xq, jnp.ones((256,)), wq, jnp.ones((384,)))),
        "fp8 blockwise": (mosaic_gpu.fp8_blockwise_mosaic,
                          (xf, jnp.ones((256, 4)), wf, jnp.ones((3, 4)))),
        "decode bf16 d128 gqa": _decode_case(1, 32, 8, 128, 4096),
        "decode bf16 d64 t4 window softcap": _decode_case(4, 8, 2, 64, 1024, sliding_window=256,
                                                          logit_softcap=30.0),
        "decode int8 paged d128": _decode_case(1, 32, 8, 128, 4096, "int8", page_size=16),
        "decode fp8 d128 t2": _decode_case(2, 16, 2, 128, 4096, "fp8"),
        "decode bf16 d128 block 128": _decode_case(1, 32, 8, 128, 4096, block_kv=128),
        "grouped matmul": _grouped_matmul_case(gmm_kernels),
        "grouped matmul two consumers": _grouped_matmul_case(two_consumers),
        "grouped matmul ping-pong": _grouped_matmul_case(two_consumers, pingpong=True),
        "grouped matmul two consumers whole N tiles": _grouped_matmul_case(two_consumers, k=256,
                                                                           n=512),
        "block-sparse fwd q-head lists d128 causal": _block_sparse_case(
            300, 4, 2, 128, 4, 128, 128, causal=True),
        "block-sparse fwd kv-head lists d64 segments": _block_sparse_case(
            300, 4, 2, 64, 2, 64, 64, segments=True, causal=True),
        "block-sparse bwd q-head lists d128 causal": _block_sparse_backward_case(
            300, 4, 2, 128, 4, 128, 128, causal=True),
        "block-sparse bwd kv-head lists d64 k64 segs": _block_sparse_backward_case(
            300, 4, 2, 64, 2, 64, 64, segments=True, causal=True),
        "block-sparse bwd kv-head lists d128 k64": _block_sparse_backward_case(
            300, 4, 2, 128, 2, 64, 64),
    }


def main():
    for name, (fn, args) in _cases().items():
        print(f"{name:46s} {' '.join(fingerprints(fn, *args))}", flush=True)


if __name__ == "__main__":
    main()
