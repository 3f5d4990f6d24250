"""Gated linear attention: reference, chunked jnp form, Pallas kernel, the
public API and its sequence-parallel form."""
from pallas_kernels.linear_attention.api import IMPLEMENTATIONS, linear_attention
from pallas_kernels.linear_attention.reference import (linear_attention_flops,
                                                       linear_attention_reference)
from pallas_kernels.linear_attention.sequence_parallel import sequence_parallel_linear_attention

__all__ = ["IMPLEMENTATIONS", "linear_attention", "linear_attention_reference",
           "linear_attention_flops", "sequence_parallel_linear_attention"]
