"""Tiny Hugging Face models for the conversion tests: transformers builds
them (float32, random weights at unit scale so that every tensor moves the
logits) and saves them as a model directory; forward passes run in torch."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from jaxkit.interop.hf_tokenizer import byte_tokenizer_json

VOCAB = 300  # holds the byte-level tokenizer's 259 ids
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, rms_norm_eps=1e-5, rope_theta=5000.0,
              max_position_embeddings=64, attention_dropout=0.0)
CASES = {
    "llama_gqa_untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                         dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mqa_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                       dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # head_dim 32 with 4 heads: q is wider than the residual stream
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(num_key_value_heads=2, sliding_window=5, head_dim=32,
                            tie_word_embeddings=False)),
    "mixtral_4x_top2": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             tie_word_embeddings=False)),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) (fan_in: the last axis), norm scales in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def save_hf_model(case: str, directory, *, seed: int = 0, tokenizer: bool = True):
    """Builds, randomizes and saves the case's model (with a byte-level
    tokenizer.json); returns the torch model in eval mode."""
    config_cls, model_cls, extra = CASES[case]
    model = model_cls(config_cls(**COMMON, **extra, attn_implementation="eager"))
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory)
    if tokenizer:
        (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def load_hf_model(directory):
    # float32: the dtype the converted config.json names
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager").eval()
