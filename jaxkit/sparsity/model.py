"""N:M sparsity on a model's Linear layers: which ones (model.sparsity.targets),
and their pruned weights for export."""
from __future__ import annotations

from flax import nnx

from jaxkit.layers.linear import Linear
from jaxkit.sparsity.mask import check_nm, zero_fraction
from jaxkit.sparsity.srste import NMSparsity


def sparse_linears(model: nnx.Module) -> list[Linear]:
    """The Linear layers of model that apply N:M sparsity."""
    return [node for _, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and node.sparsity is not None]


def sparsify_linears(model: nnx.Module, cfg) -> int:
    """Makes every Linear of model whose target cfg.targets names train N:M
    sparse with SR-STE (cfg: a jaxkit.config.SparsityConfig); returns how
    many. ValueError naming the layer when m does not divide its input
    dimension. Nothing changes when cfg.enabled is false."""
    if not cfg.enabled:
        return 0
    sparsity = NMSparsity(cfg.n, cfg.m, cfg.srste_decay)
    count = 0
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.target in cfg.targets:
            try:
                check_nm(cfg.n, cfg.m, node.kernel.shape[-2])
            except ValueError as err:
                name = "/".join(map(str, path))
                raise ValueError(f"model.sparsity on {name} (target {node.target!r}): {err}") \
                    from None
            node.sparsity = sparsity
            count += 1
    return count


def prune_linears(model: nnx.Module) -> float:
    """Replaces the kernel of every sparse Linear by the pruned weight its
    forward uses (in place, for export); returns the fraction of zeros over
    those kernels (0.0 when there are none)."""
    zeros = total = 0
    for linear in sparse_linears(model):
        pruned = linear.sparsity.prune(linear.kernel[...])
        linear.kernel[...] = pruned
        zeros += zero_fraction(pruned) * pruned.size
        total += pruned.size
    return zeros / total if total else 0.0
