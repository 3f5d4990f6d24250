"""Pallas kernels for efficient transformers, one folder per op.

Each op folder holds a pure-jnp reference (the spec), Pallas kernel(s) and a
public function with ``implementation=`` dispatch.
"""
from pallas_kernels.attention import flash_attention

__all__ = ["flash_attention"]
