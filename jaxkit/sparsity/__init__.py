"""N:M structured sparsity trained from scratch with SR-STE: magnitude masks
along a weight's input axis, the SR-STE masking op, and their application to
a model's Linear layers (model.sparsity)."""
from jaxkit.sparsity.mask import check_nm, nm_mask, nm_prune, zero_fraction
from jaxkit.sparsity.model import prune_linears, sparse_linears, sparsify_linears
from jaxkit.sparsity.srste import NMSparsity, srste_prune

__all__ = [
    "NMSparsity",
    "check_nm",
    "nm_mask",
    "nm_prune",
    "prune_linears",
    "sparse_linears",
    "sparsify_linears",
    "srste_prune",
    "zero_fraction",
]
