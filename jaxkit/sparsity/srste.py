"""SR-STE: training N:M sparse weights from scratch (Zhou et al. 2021,
"Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch").

The forward multiplies by the pruned weight W~ = mask(W) * W, the mask
recomputed from the dense weight at every step, so pruned weights may grow
back. The backward passes the gradient of W~ straight through to the dense
W and adds the sparse-refined term decay * (1 - mask) * W, which pulls the
pruned weights towards zero and so stabilises the mask:

    dL/dW := dL/dW~ + decay * (1 - mask) * W

Written as a custom_vjp on the masking op so that any optimizer sees the
modified gradient (with Adam the term is normalised with the rest of the
gradient; the paper used SGD with momentum)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxkit.sparsity.mask import check_nm, nm_mask, nm_prune


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def srste_prune(w, n: int, m: int, decay: float, axis: int = -2):
    """nm_prune(w) in the forward; the SR-STE gradient to w in the backward."""
    return nm_prune(w, n, m, axis)


def _srste_fwd(w, n, m, decay, axis):
    keep = nm_mask(w, n, m, axis)
    return jnp.where(keep, w, jnp.zeros((), w.dtype)), (w, keep)


def _srste_bwd(n, m, decay, axis, residuals, g):
    w, keep = residuals
    pruned = jnp.where(keep, 0.0, w.astype(jnp.float32))
    return ((g.astype(jnp.float32) + decay * pruned).astype(w.dtype),)


srste_prune.defvjp(_srste_fwd, _srste_bwd)


@dataclasses.dataclass(frozen=True)
class NMSparsity:
    """The N:M sparsity a Linear applies to its kernel [..., in, out] before
    every matmul (set by jaxkit.sparsity.sparsify_linears)."""
    n: int
    m: int
    decay: float  # the SR-STE lambda

    def __post_init__(self):
        check_nm(self.n, self.m)
        if not self.decay >= 0:
            raise ValueError(f"SR-STE decay must be >= 0, got {self.decay}")

    def __call__(self, kernel):
        return srste_prune(kernel, self.n, self.m, self.decay, -2)

    def prune(self, kernel):
        """The weight the forward uses, without the custom gradient (export)."""
        return nm_prune(kernel, self.n, self.m, -2)
