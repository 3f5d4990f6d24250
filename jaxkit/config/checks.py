"""Checks of a loaded Config: each key's declared range, then the
cross-field combinations a type cannot express (those that need no other
package)."""
from __future__ import annotations

import dataclasses
import math
import typing

from jaxkit.config.schema import (LORA_TARGETS, Config, ConfigError, LoRAConfig, ModelConfig,
                                  SparsityTarget)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_ranges(section, prefix: str = "") -> None:
    """Every numeric key of a config (or of one section) against the range
    declared beside its field; floats must be finite."""
    for f in dataclasses.fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif value is not None and "range" in f.metadata:
            _require(not isinstance(value, float) or math.isfinite(value),
                     f"{key} must be a finite number, got {value!r}")
            valid = f.metadata["range"]
            _require(value in valid, f"{key} must be {'in ' * (str(valid)[0] in '[(')}{valid}, "
                     f"got {value!r}")


def validate(cfg: Config) -> None:
    """Each key's range, then the cross-field checks that a type alone cannot
    express (those that need no other package)."""
    check_ranges(cfg)
    m = cfg.model
    _require(m.head_dim is not None or m.d_model % m.num_heads == 0,
             f"model.num_heads ({m.num_heads}) must divide model.d_model ({m.d_model}) "
             "unless model.head_dim is set")
    _require(m.num_heads % m.kv_heads == 0,
             f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    _require(m.dim_per_head % 2 == 0, f"head dim {m.dim_per_head} must be even for rotary embeddings")
    a = m.attention
    _validate_mixer(cfg)
    _validate_sparse_attention(m)
    e = m.moe
    if e.num_experts:
        _require(e.top_k <= e.num_experts,
                 f"model.moe.top_k ({e.top_k}) must be in [1, num_experts={e.num_experts}]")
        _require(e.first_layer < m.num_layers,
                 f"model.moe.first_layer ({e.first_layer}) must be < num_layers ({m.num_layers})")
        _require(e.num_experts % e.num_groups == 0,
                 f"model.moe.num_groups ({e.num_groups}) must divide num_experts ({e.num_experts})")
        if e.router == "grouped":
            _require(e.top_k % e.num_groups == 0,
                     f"model.moe.top_k ({e.top_k}) must be a multiple of num_groups ({e.num_groups}) "
                     "for the grouped router")
        _require(e.num_groups == 1 or e.router == "grouped",
                 f"model.moe.num_groups ({e.num_groups}) needs router: grouped, got {e.router!r}")
        _require(e.gmm_consumers == 1 or (e.dispatch == "dropless"
                                           and e.gmm_implementation in ("auto", "mosaic_gpu")),
                 f"model.moe.gmm_consumers={e.gmm_consumers} splits the Mosaic GPU grouped "
                 "matmuls' tiles: it needs dispatch 'dropless' and gmm_implementation 'auto' or "
                 f"'mosaic_gpu', got {e.dispatch!r} and {e.gmm_implementation!r}")
        _require(not e.gmm_pingpong or e.gmm_consumers == 2,
                 "model.moe.gmm_pingpong alternates grouped-matmul items between two consumer "
                 f"warpgroups: it needs gmm_consumers: 2, got {e.gmm_consumers}")
        _require(e.router != "expert_choice" or e.dispatch == "capacity",
                 "model.moe.router 'expert_choice' gives every expert a fixed number of tokens: "
                 f"it needs dispatch: capacity, got {e.dispatch!r}")
    d = cfg.data
    _require(d.seq_len <= m.max_seq_len,
             f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    _require(not d.document_mask or d.kind == "tokens",
             f"data.document_mask applies to data.kind 'tokens', not {d.kind!r}")
    _require(not d.document_mask or a.implementation != "cudnn",
             "data.document_mask needs segment ids, which model.attention.implementation "
             "'cudnn' does not take; use 'pallas', 'xla' or 'auto'")
    t = cfg.train
    _require(d.batch_size % t.grad_accum == 0,
             f"train.grad_accum ({t.grad_accum}) must divide data.batch_size ({d.batch_size})")
    _require(t.init_from != "", "train.init_from is empty: give a run directory, or null")
    _require(t.init_from is None or cfg.lora.base is None, "train.init_from and lora.base both "
             "name the model to start from: a LoRA run adapts lora.base; set one of them")
    _require(sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor", "expert", "sequence")) <= 1,
             "at most one mesh axis may be -1")
    o = cfg.optimizer
    _require(o.mu_dtype == "float32" or o.name != "adafactor",
             f"optimizer.mu_dtype {o.mu_dtype!r} applies to adamw and lion; adafactor keeps no "
             "first moment")
    _require(not o.master_weights or cfg.model.param_dtype != "float32",
             "optimizer.master_weights keeps float32 copies of low-precision parameters; "
             "model.param_dtype is 'float32': set it to 'bfloat16' or drop master_weights")
    _validate_sparsity(cfg)
    _validate_lora(cfg)


def _validate_sparsity(cfg: Config) -> None:
    sp, m = cfg.model.sparsity, cfg.model
    if not sp.enabled:
        return
    _require(sp.n < sp.m, f"model.sparsity.n ({sp.n}) must be < model.sparsity.m ({sp.m})")
    _require(bool(sp.targets), "model.sparsity.targets is empty: name the projections to prune, "
             f"among {list(typing.get_args(SparsityTarget))}")
    # the input (grouped) dimension of each target's weights
    inputs = {"q": [m.d_model], "k": [m.d_model], "v": [m.d_model],
              "o": [m.num_heads * m.dim_per_head], "mlp": [m.d_model, m.mlp_hidden],
              "head": [m.d_model]}
    for target in sp.targets:
        for size in inputs[target]:
            _require(size % sp.m == 0, f"model.sparsity.m ({sp.m}) must divide the input dimension "
                     f"{size} of target {target!r}")
    _require(m.quant.mode in ("none", "qat"), "model.sparsity trains from scratch: it needs "
             f"model.quant.mode 'none' or 'qat', got {m.quant.mode!r}")
    _require(not m.quant.hadamard or m.quant.mode == "none",
             "model.sparsity with model.quant.hadamard: the rotated weights are not N:M sparse; "
             "set model.quant.hadamard=false")
    _require(cfg.lora.base is None, "model.sparsity trains the whole model from scratch; it "
             "cannot be combined with lora.base")


def _validate_sparse_attention(m: ModelConfig) -> None:
    a, sp = m.attention, m.attention.sparse
    if sp.policy == "none":
        return
    key = "model.attention.sparse"
    _require(sp.block_size & (sp.block_size - 1) == 0,
             f"{key}.block_size must be a power of two, got {sp.block_size}")
    _require(a.implementation != "cudnn", f"{key} runs block_sparse_attention, which has no "
             "'cudnn' implementation: set model.attention.implementation to auto, pallas or xla")
    _require(a.sliding_window is None and a.logit_softcap is None, f"{key} does not combine with "
             "model.attention.sliding_window or logit_softcap (policy window_sinks is a window)")
    _require(any(m.is_sparse_attention_layer(i) for i in range(m.num_layers)),
             f"{key} (first_layer {sp.first_layer}, every {sp.every}) selects no softmax layer "
             f"of the {m.num_layers}")
    if sp.policy in ("infllm_v2", "proxy"):
        forced = -(-sp.window // sp.block_size) + -(-sp.sinks // sp.block_size)
        _require(sp.top_k_blocks >= forced, f"{key}.top_k_blocks ({sp.top_k_blocks}) must cover "
                 f"the {forced} window and sink blocks it always keeps")
    group = m.num_heads // m.kv_heads
    _require(sp.proxy_heads <= group, f"{key}.proxy_heads ({sp.proxy_heads}) exceeds the "
             f"{group} query heads per kv head")


def _validate_mixer(cfg: Config) -> None:
    m, la = cfg.model, cfg.model.linear_attention
    _require(m.softmax_every == 0 or m.mixer == "linear",
             f"model.softmax_every ({m.softmax_every}) places softmax layers among linear ones: "
             f"it needs model.mixer 'linear', got {m.mixer!r}")
    _require(m.softmax_every <= m.num_layers, f"model.softmax_every ({m.softmax_every}) "
             f"exceeds model.num_layers ({m.num_layers})")
    _require(la.chunk_size & (la.chunk_size - 1) == 0, "model.linear_attention.chunk_size must "
             f"be a power of two, got {la.chunk_size}")
    _require(la.decay == "scalar" or la.implementation in ("auto", "xla"),
             f"model.linear_attention.decay 'per_key' runs on implementation 'xla' (or 'auto'), "
             f"not {la.implementation!r}: the Pallas kernel takes a per-head decay")
    _require(m.mixer == "softmax" or not cfg.data.document_mask,
             "data.document_mask needs segment ids, which model.mixer 'linear' does not take "
             "(its state runs across documents)")


def _validate_lora(cfg: Config) -> None:
    lora, m = cfg.lora, cfg.model
    if lora.base is None:
        given = [f"lora.{f.name}" for f in dataclasses.fields(lora)
                 if getattr(lora, f.name) != getattr(LoRAConfig(), f.name)]
        _require(not given, f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
                 "lora.base is not: LoRA needs the frozen model to adapt (a run directory, a "
                 "`jaxkit export` or a `jaxkit quantize --out` directory)")
        return
    _require(bool(lora.targets), "lora.targets is empty: name the projections to adapt, "
             f"among {list(LORA_TARGETS)}")
    twice = sorted({t for t in lora.targets if lora.targets.count(t) > 1})
    _require(not twice, f"lora.targets names {', '.join(map(repr, twice))} more than once")
    _require(not m.scan_layers, "lora needs model.scan_layers=false: adapters are per layer "
             "(a base trained with scanned layers is loaded unrolled)")
    _require(m.quant.mode in ("none", "int"), "lora needs model.quant.mode 'none' (a float base) "
             f"or 'int' (QLoRA on a `jaxkit quantize --out` directory), got {m.quant.mode!r}")
    _require(not m.moe.num_experts or m.moe.router != "sigmoid_bias",
             "lora keeps the base frozen, but router 'sigmoid_bias' updates its balancing bias "
             "in training: use another model.moe.router, or train the whole model")
