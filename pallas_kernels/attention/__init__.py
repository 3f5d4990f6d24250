"""Flash attention: reference, Pallas kernels and the public API."""
from pallas_kernels.attention.api import IMPLEMENTATIONS, flash_attention
from pallas_kernels.attention.reference import (attention_flops, attention_reference,
                                                attention_reference_with_lse)

__all__ = ["IMPLEMENTATIONS", "flash_attention", "attention_reference",
           "attention_reference_with_lse", "attention_flops"]
