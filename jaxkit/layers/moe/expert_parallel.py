"""Running the MoE layer on a device mesh.

The mesh axes come from the active sharding rules (jaxkit.sharding.activate):
tokens are split like the residual stream, over the mesh axes of the logical
axes "batch" and "length" (by default data, fsdp, expert and sequence), and
the experts over those of "exp" (by default expert), like their weights.
Every device routes and dispatches its own tokens, so no global sort or
gather over the batch is ever needed. With n > 1 expert shards, inside
shard_map an all-to-all sends every routed token to the device that holds its
expert and a second one brings the result back. Routing statistics are summed over the token axes, so losses,
metrics and the balancing bias are those of the whole batch. Dropless results
equal the single-device ones; capacity and expert-choice routing fill their
slots per token shard (as GShard does per group).

Expert weights are gathered over any other axis (fsdp, tensor) on entry, the
FSDP way; their gradients are reduced by shard_map's transpose.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxkit.layers.moe.experts import ExpertWeights, LocalExperts
from jaxkit.layers.moe.permute import bincount, sort_ids, take_rows
from jaxkit.sharding import mesh_axes


@dataclasses.dataclass(frozen=True)
class ShardedExperts:
    """This device's shard of the experts, reached from every device's tokens
    by all-to-all over the mesh axes `axis` (to be used inside shard_map)."""
    local: LocalExperts
    axis: tuple[str, ...]
    size: int

    def grouped(self, rows, sorted_expert):
        """rows [A, D] sorted by global expert id -> [A, D] in rows.dtype.

        Every device sends each shard a fixed buffer of A rows (the most it can
        need), so the exchange is a plain all-to-all and nothing is dropped.
        Rows move by gathers both ways (permute.take_rows).
        """
        A, D = rows.shape
        n, per_shard = self.size, self.local.num_experts
        shard = sorted_expert // per_shard
        sizes = bincount(shard, n)
        starts = jnp.cumsum(sizes) - sizes  # rows of a shard are contiguous
        place = jnp.arange(A, dtype=jnp.int32)
        # buffer row s * A + i holds row starts[s] + i (A: empty); row a goes to dest[a]
        source = jnp.where(place < sizes[:, None], starts[:, None] + place, A).reshape(-1)
        dest = shard * A + place - starts[shard]
        send = take_rows(rows, source, dest[:, None]).reshape(n, A, D)
        # local expert id of every buffer row; per_shard marks padding
        send_id = jnp.where(source < A, jnp.take(sorted_expert % per_shard, source, mode="clip"),
                            per_shard).reshape(n, A)
        exchange = lambda v: jax.lax.all_to_all(v, self.axis, 0, 0, tiled=True)
        recv, recv_id = exchange(send).reshape(-1, D), exchange(send_id).reshape(-1)
        s = sort_ids(recv_id)  # padding sorts last
        out = self.local.grouped(take_rows(recv, s.order, s.inverse[:, None]), s.ids)
        out = take_rows(out, s.inverse, s.order[:, None]).reshape(n, A, D)
        return take_rows(exchange(out).reshape(-1, D), dest, source[:, None])

    def buffered(self, x_e):
        """x_e [E, C, D] -> [E, C, D] in x_e.dtype; expert shard j gets every
        device's slots of its experts."""
        local = jax.lax.all_to_all(x_e, self.axis, 0, 1, tiled=True)  # [E / n, n * C, D]
        return jax.lax.all_to_all(self.local.buffered(local), self.axis, 1, 0, tiled=True)


def _reshard(x, spec, mesh):
    """Explicit-sharding meshes need inputs in the exact layout shard_map
    declares; with Auto axes shard_map reshards by itself."""
    if mesh.are_all_axes_explicit:
        return jax.reshard(x, spec)
    if mesh.are_all_axes_auto:
        return x
    raise ValueError(f"MoE layer needs a mesh whose axes are all Explicit or all Auto, got "
                     f"{dict(zip(mesh.axis_names, mesh.axis_types))}")


def sharded_moe(body, x, router_kernel, bias, shift, weights: ExpertWeights, *, mesh, rules,
                implementation, quant=None, consumers=1, pingpong=False):
    """Runs body(x2d, router_kernel, bias, shift, experts) -> (y2d, RoutingStats)
    per device inside shard_map; returns (y [B, S, D] float32, summed stats).
    bias and shift: replicated per-expert arrays, or None.
    rules: the logical-axis rules that place tokens and experts on `mesh`.
    quant: the experts' jaxkit.quant.ExpertQuant (replicated), or None;
    consumers, pingpong: the grouped matmuls' (model.moe.gmm_consumers,
    gmm_pingpong)."""
    B, S, D = x.shape
    E = weights.gate.shape[0]
    batch, seq, exp = (mesh_axes(name, rules, mesh) for name in ("batch", "length", "exp"))
    for what, n, axes in (("batch size", B, batch), ("sequence length", S, seq),
                          ("num_experts", E, exp)):
        shards = math.prod(mesh.shape[a] for a in axes)
        if n % shards:
            raise ValueError(f"MoE layer: {what} {n} is not divisible by the {shards} shards "
                             f"of mesh axes {axes}")
    ep = math.prod(mesh.shape[a] for a in exp)
    token_axes = batch + seq
    x_spec = P(batch or None, seq or None, None)
    w_spec = P(exp or None, None, None)
    args = {"x": x, "router": router_kernel, "weights": weights, "bias": bias, "shift": shift,
            "quant": quant}
    # every weight array (float, or low-bit codes/scales) leads with the expert axis
    specs = {"x": x_spec, "router": P(), "weights": jax.tree.map(lambda _: w_spec, weights),
             "bias": None if bias is None else P(), "shift": None if shift is None else P(),
             "quant": jax.tree.map(lambda _: P(), quant)}
    args = jax.tree.map(lambda s, a: _reshard(a, s, mesh), specs, args,
                        is_leaf=lambda s: isinstance(s, P))

    def local(args):
        experts = LocalExperts(args["weights"], implementation, args["quant"], consumers, pingpong)
        if ep > 1:
            experts = ShardedExperts(experts, exp, ep)
        b, s, _ = args["x"].shape
        y, stats = body(args["x"].reshape(b * s, D), args["router"], args["bias"], args["shift"],
                        experts)
        if token_axes:
            stats = jax.lax.psum(stats, token_axes)
        return y.reshape(b, s, D), stats

    # check_vma=False: Pallas kernels inside (the grouped matmuls) declare
    # plain output shapes, which the varying-axes check rejects.
    y, stats = jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=(x_spec, P()),
                             check_vma=False)(args)
    if mesh.are_all_axes_explicit:
        y = jax.reshard(y, jax.typeof(x).sharding.spec)
    return y, stats
