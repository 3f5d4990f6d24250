"""Hugging Face config.json <-> jaxkit ModelConfig, for the decoders that
jaxkit's Transformer computes exactly: Llama and Mistral (grouped-query
attention, rotary embeddings, RMSNorm, SwiGLU, tied or untied head;
Mistral's sliding window) and Mixtral (every layer a top-k softmax router
over SwiGLU experts, the k weights renormalised to sum to 1).

A config.json setting that changes the computation in a way the Transformer
does not follow (scaled rotary embeddings, biases, another activation, ...)
is refused, naming the key. Both directions are pure functions of dicts and
configs."""
from __future__ import annotations

import dataclasses

from jaxkit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, check_ranges
from jaxkit.interop.errors import ConversionError

# HF architecture -> its model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "MixtralForCausalLM": "mixtral"}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")
# transformers' defaults for the keys a config.json may leave out, by model_type
DEFAULTS = {
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  tie_word_embeddings=False, sliding_window=None, num_key_value_heads=None),
    "mistral": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, sliding_window=4096, num_key_value_heads=8),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, sliding_window=None, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2),
}
# HF weight dtype -> (model.param_dtype, model.compute_dtype): float16 weights
# are held in float32 (jaxkit keeps parameters in float32 or bfloat16) and
# computed in float16 as transformers does.
DTYPES = {"float32": ("float32", "float32"), "bfloat16": ("bfloat16", "bfloat16"),
          "float16": ("float32", "float16")}


def model_type_of(hf: dict) -> str:
    """The model_type of a supported config.json; ConversionError naming the
    architecture otherwise."""
    archs = hf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConversionError(f"config.json: 'architectures' must name one architecture, got "
                              f"{archs!r}")
    if archs[0] not in ARCHITECTURES:
        raise ConversionError(f"architecture {archs[0]!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})")
    model_type = ARCHITECTURES[archs[0]]
    if hf.get("model_type", model_type) != model_type:
        raise ConversionError(f"config.json: model_type {hf['model_type']!r} does not match "
                              f"architecture {archs[0]!r} (model_type {model_type!r})")
    return model_type


def _rope_theta(hf: dict, default: float) -> float:
    """rope_theta of unscaled rotary embeddings over the whole head; scaled
    ones (transformers >= 5: rope_parameters, before: rope_scaling) are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type != "default":
            raise ConversionError(f"config.json: {key} type {rope_type!r} is not supported "
                                  "(jaxkit's rotary embeddings are unscaled)")
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if fraction not in (None, 1, 1.0):
        raise ConversionError(f"config.json: partial_rotary_factor {fraction!r} is not supported "
                              "(jaxkit rotates the whole head)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(default if theta is None else theta)


def _refuse_features(hf: dict) -> None:
    """Settings that change the computation in ways jaxkit does not follow."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported "
                              "(jaxkit's MLP is SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"config.json: {key} true is not supported (jaxkit's "
                                  "projections have no bias)")
    for key in ("attention_dropout", "router_jitter_noise"):
        if hf.get(key):
            raise ConversionError(f"config.json: {key} {hf[key]!r} is not supported (jaxkit "
                                  "has no dropout or router noise); set it to 0")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ConversionError(f"config.json: quantized weights (quantization_config "
                              f"{method!r}) are not supported; convert the float checkpoint")
    layer_types = hf.get("layer_types")
    if layer_types and len(set(layer_types)) > 1:
        raise ConversionError(f"config.json: layer_types mixes {sorted(set(layer_types))}; "
                              "jaxkit attends alike in every layer")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a config.json, for float32 weights (see
    with_weight_dtype)."""
    model_type = model_type_of(hf)
    missing = [k for k in REQUIRED_KEYS if hf.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}")
    _refuse_features(hf)
    d = DEFAULTS[model_type]
    get = lambda key: hf[key] if hf.get(key) is not None else d.get(key)
    heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim")
    window = None if model_type == "llama" else get("sliding_window")
    moe = MoEConfig()
    if model_type == "mixtral":
        moe = MoEConfig(num_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
                        expert_hidden=hf["intermediate_size"], router="topk_softmax",
                        renormalize=True, num_shared_experts=0, first_layer=0, every=1)
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=None if head_dim is None or head_dim * heads == d_model else head_dim,
        mlp_hidden=hf["intermediate_size"], max_seq_len=get("max_position_embeddings"),
        rope_theta=_rope_theta(hf, d["rope_theta"]), norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")), param_dtype="float32",
        compute_dtype="float32", attention=AttentionConfig(sliding_window=window), moe=moe)
    try:
        check_ranges(cfg, "model.")
    except ConfigError as e:
        raise ConversionError(f"config.json: {e}") from None
    if cfg.num_heads % cfg.kv_heads or cfg.dim_per_head % 2 or \
            (head_dim is None and d_model % heads):
        raise ConversionError(f"config.json: {heads} attention heads, {kv_heads} key-value heads "
                              f"and hidden_size {d_model} (head_dim {head_dim}) do not make a "
                              "grouped-query attention with an even head dimension")
    if moe.num_experts and moe.top_k > moe.num_experts:
        raise ConversionError(f"config.json: num_experts_per_tok ({moe.top_k}) exceeds "
                              f"num_local_experts ({moe.num_experts})")
    return cfg


def with_weight_dtype(m: ModelConfig, weight_dtype: str) -> ModelConfig:
    """m for weights stored in weight_dtype (a numpy dtype name)."""
    if weight_dtype not in DTYPES:
        raise ConversionError(f"weights stored as {weight_dtype} are not supported (supported: "
                              f"{', '.join(DTYPES)})")
    param_dtype, compute_dtype = DTYPES[weight_dtype]
    return dataclasses.replace(m, param_dtype=param_dtype, compute_dtype=compute_dtype)


def _check_exportable(m: ModelConfig) -> None:
    """Refuses what no supported architecture computes."""
    if m.quant.mode != "none":
        raise ConversionError(f"model.quant.mode {m.quant.mode!r}: only float models convert; "
                              "convert the run before quantisation")
    if m.attention.logit_softcap is not None:
        raise ConversionError(f"model.attention.logit_softcap {m.attention.logit_softcap} has no "
                              "equivalent in Llama, Mistral or Mixtral")
    if m.mixer != "softmax":
        raise ConversionError(f"model.mixer {m.mixer!r}: Llama, Mistral and Mixtral have softmax "
                              "attention in every layer")
    if m.attention.sparse.policy != "none":
        raise ConversionError(f"model.attention.sparse.policy {m.attention.sparse.policy!r}: "
                              "Llama, Mistral and Mixtral attend densely")
    if m.sparsity.enabled:
        raise ConversionError("model.sparsity: export the run with `jaxkit export` (it writes the "
                              "pruned weights), then convert a config without sparsity")
    e = m.moe
    if not e.num_experts:
        return
    # Mixtral: every layer routes each token to its top-k experts by softmax,
    # renormalised over the k, and has no shared expert.
    wanted = dict(router="topk_softmax", renormalize=True, num_shared_experts=0, first_layer=0,
                  every=1)
    for key, value in wanted.items():
        if getattr(e, key) != value:
            raise ConversionError(f"model.moe.{key} {getattr(e, key)!r}: Mixtral needs "
                                  f"{value!r}")


def hf_config_from_model(m: ModelConfig, special_ids: dict | None = None) -> dict:
    """The config.json of a ModelConfig: Mixtral for an MoE model, Mistral
    for a dense one with a sliding window, Llama otherwise. special_ids
    (pad/bos/eos -> id or None): the tokenizer's, recorded as transformers'
    *_token_id keys."""
    _check_exportable(m)
    if m.moe.num_experts:
        arch = "MixtralForCausalLM"
    else:
        arch = "MistralForCausalLM" if m.attention.sliding_window else "LlamaForCausalLM"
    hf = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch],
        "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.moe.expert_hidden if m.moe.num_experts else m.mlp_hidden,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "torch_dtype": m.param_dtype,
    }
    if m.head_dim is not None:  # else hidden_size / num_attention_heads, as in jaxkit
        hf["head_dim"] = m.head_dim
    if arch != "LlamaForCausalLM":
        hf["sliding_window"] = m.attention.sliding_window
    if m.moe.num_experts:
        hf.update(num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                  router_jitter_noise=0.0)
    for role, token_id in (special_ids or {}).items():
        hf[f"{role}_token_id"] = token_id
    return hf
