"""Pallas kernels for efficient transformers, one folder per op.

Each op folder holds a pure-jnp reference (the spec), Pallas kernel(s) and a
public function with ``implementation=`` dispatch. The training ops are
re-exported here; the others are imported from their folder, e.g.
``from pallas_kernels.decode_attention import decode_attention`` (a
re-export of that name would hide the folder's modules).
"""
from pallas_kernels.attention import flash_attention
from pallas_kernels.grouped_matmul import gmm

__all__ = ["flash_attention", "gmm"]
