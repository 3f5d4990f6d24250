"""LoRA and QLoRA: low-rank adapters trained on the projections of a frozen
(float or low-bit) model, and merged into its weights for export."""
from jaxkit.lora.apply import adapter_state, apply_lora, freeze
from jaxkit.lora.layer import Frozen, LoRALinear, LoRAParam, LoRARng
from jaxkit.lora.merge import merge_lora

__all__ = ["Frozen", "LoRALinear", "LoRAParam", "LoRARng", "adapter_state", "apply_lora", "freeze",
           "merge_lora"]
