"""Typed run configuration: frozen dataclasses loaded from YAML with strict checks.

Every key is checked on loading: an unknown key names the closest valid ones,
a wrong type names the key and the expected type, and an impossible
combination (heads not dividing d_model, ...) names the values.

This module imports only the standard library and yaml, so loading and
printing a config never starts jax. The checks that need the packages a
config configures (mesh.rules against the sharding rules, model.quant against
the quantisation formats and kernels) run where the config becomes objects:
jaxkit.run.build.check_config.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key, value or combination that cannot be run."""


class Range:
    """The values a numeric key accepts, written as the reference shows them:
    '>= 1', '> 0', '[0, 1)', '(0, 100]', with special values outside the
    interval before it ('-1 or >= 1'). Floats must also be finite."""

    def __init__(self, spec: str):
        self.spec = spec
        *special, interval = spec.split(" or ")
        self.special = tuple(int(v) for v in special)
        if m := re.fullmatch(r"(>=?) (\S+)", interval):
            self.low, self.high = float(m[2]), math.inf
            self.low_open, self.high_open = m[1] == ">", True
        elif m := re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval):
            self.low, self.high = float(m[2]), float(m[3])
            self.low_open, self.high_open = m[1] == "(", m[4] == ")"
        else:
            raise ValueError(f"unreadable range {spec!r}")

    def __contains__(self, value) -> bool:
        if value in self.special:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return self.spec


def ranged(default, spec: str):
    """A numeric field and the range of values it accepts (None always passes)."""
    return dataclasses.field(default=default, metadata={"range": Range(spec)})


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Block-sparse softmax attention in chosen layers (jaxkit.layers.sparse_attention,
    docs/design/block-selection.md): a policy lists each query block's key
    blocks from the layer's own q and k; decoding stays dense."""
    policy: Literal["none", "window_sinks", "infllm_v2", "proxy"] = "none"
    block_size: int = ranged(64, ">= 16")  # query and key block, in tokens; a power of two
    window: int = ranged(64, ">= 1")  # tokens up to each block's end kept, in whole blocks
    sinks: int = ranged(64, ">= 0")  # the first tokens every query block keeps, in whole blocks
    # infllm_v2, proxy: key blocks a query block keeps (window and sinks
    # included; proxy: per query head on average over its group)
    top_k_blocks: int = ranged(16, ">= 1")
    dense_below: int = ranged(0, ">= 0")  # infllm_v2, proxy: dense up to this many tokens
    group_score: Literal["max", "mean"] = "max"  # infllm_v2: over a kv group's query heads
    proxy_heads: int = ranged(0, ">= 0")  # proxy: a group's first n query heads rank (0: all)
    coverage: float = ranged(0.9, "(0, 1]")  # proxy: score mass a head's demand covers
    every: int = ranged(1, ">= 1")  # sparse attention in every k-th softmax layer
    first_layer: int = ranged(0, ">= 0")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    implementation: Literal["auto", "xla", "cudnn", "pallas", "mosaic_gpu", "blockspec"] = "auto"
    sliding_window: int | None = ranged(None, ">= 1")
    logit_softcap: float | None = ranged(None, "> 0")
    sparse: SparseAttentionConfig = dataclasses.field(default_factory=SparseAttentionConfig)


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """The gated linear attention (GLA) mixer of model.mixer 'linear'."""
    implementation: Literal["auto", "xla", "pallas", "blockspec"] = "auto"
    chunk_size: int = ranged(64, ">= 16")  # a power of two
    decay: Literal["scalar", "per_key"] = "scalar"  # one decay per head, or per key dimension


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = ranged(0, ">= 0")  # 0: dense MLP everywhere
    every: int = ranged(1, ">= 1")  # an MoE layer replaces the MLP in every k-th layer
    first_layer: int = ranged(0, ">= 0")  # index of the first MoE layer
    top_k: int = ranged(2, ">= 1")
    expert_hidden: int = ranged(256, ">= 1")
    num_shared_experts: int = ranged(0, ">= 0")
    router: Literal["topk_softmax", "sigmoid_bias", "expert_choice", "grouped"] = "topk_softmax"
    renormalize: bool = True  # softmax routers: chosen weights sum to 1 (Mixtral); false: raw (Switch)
    num_groups: int = ranged(1, ">= 1")  # for router: grouped
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = ranged(1.25, "> 0")
    aux_loss_weight: float = ranged(0.01, ">= 0")
    router_z_loss_weight: float = ranged(0.001, ">= 0")
    bias_update_rate: float = ranged(0.001, ">= 0")  # aux-loss-free balancing (sigmoid_bias)
    # Route from the input minus its batch mean (a running mean outside
    # training), so the routing is balanced from the first step.
    center_router_input: bool = False
    gmm_implementation: Literal["auto", "xla", "ragged_dot", "pallas", "mosaic_gpu",
                                "blockspec"] = "auto"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    mode: Literal["none", "qat", "ptq", "int"] = "none"  # int: real low-bit storage
    weight_format: str | None = None  # e.g. int8, int4, fp8_e4m3, mxfp4, nvfp4
    activation_format: str | None = None
    gradient_format: str | None = None
    # how gradient_format rounds the output gradient: to nearest, or
    # stochastically (unbiased; a PRNG key per layer advanced every training step)
    gradient_rounding: Literal["nearest", "stochastic"] = "nearest"
    # None: the format's own groups (per-channel weights and per-token
    # activations for scalar formats, the fixed blocks of MX/NV formats)
    granularity: Literal["tensor", "channel", "token", "block"] | None = None
    block_size: int | None = ranged(None, ">= 1")
    scale_method: Literal["absmax", "percentile", "mse"] = "absmax"
    percentile: float = ranged(99.9, "(0, 100]")
    targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "experts")
    hadamard: bool = False
    smoothquant_alpha: float | None = ranged(None, "[0, 1]")
    calibration_batches: int = ranged(4, ">= 1")


# the Linear targets N:M sparsity applies to (as model.quant.targets; a MoE
# layer's routed and shared experts are never pruned)
SparsityTarget = Literal["q", "k", "v", "o", "mlp", "head"]


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """N:M structured sparsity trained from scratch with SR-STE (jaxkit.sparsity):
    in every group of m consecutive input features of a target's weight the n
    largest magnitudes are kept, the mask recomputed every step."""
    enabled: bool = False
    n: int = ranged(2, ">= 1")
    m: int = ranged(4, ">= 2")
    targets: tuple[SparsityTarget, ...] = ("q", "k", "v", "o", "mlp")
    srste_decay: float = ranged(2e-4, ">= 0")  # lambda of the term added to pruned weights' gradients


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = ranged(259, ">= 1")
    d_model: int = ranged(256, ">= 1")
    num_layers: int = ranged(4, ">= 1")
    num_heads: int = ranged(4, ">= 1")
    num_kv_heads: int | None = ranged(None, ">= 1")  # None: equal to num_heads
    head_dim: int | None = ranged(None, ">= 1")  # None: d_model // num_heads
    mlp_hidden: int = ranged(1024, ">= 1")
    max_seq_len: int = ranged(256, ">= 1")
    rope_theta: float = ranged(10000.0, "> 0")
    norm_eps: float = ranged(1e-6, "> 0")
    tie_embeddings: bool = True
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    remat: Literal["none", "full", "save_dots"] = "none"
    scan_layers: bool = False
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    # the token mixer of every layer; with 'linear', softmax_every k > 0 keeps
    # softmax attention in every k-th layer (layers k-1, 2k-1, ...)
    mixer: Literal["softmax", "linear"] = "softmax"
    softmax_every: int = ranged(0, ">= 0")
    linear_attention: LinearAttentionConfig = dataclasses.field(
        default_factory=LinearAttentionConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def is_linear_layer(self, layer: int) -> bool:
        k = self.softmax_every
        return self.mixer == "linear" and not (k and layer % k == k - 1)

    def is_sparse_attention_layer(self, layer: int) -> bool:
        sp = self.attention.sparse
        return (sp.policy != "none" and not self.is_linear_layer(layer) and layer >= sp.first_layer
                and (layer - sp.first_layer) % sp.every == 0)

    def is_moe_layer(self, layer: int) -> bool:
        m = self.moe
        return m.num_experts > 0 and layer >= m.first_layer and (layer - m.first_layer) % m.every == 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: Literal["tokens", "mqar"] = "tokens"
    path: str = "data_cache/stdlib"  # token-file directory with train/val files
    seq_len: int = ranged(256, ">= 1")
    batch_size: int = ranged(16, ">= 1")  # global batch, in sequences
    seed: int = ranged(0, ">= 0")
    # tokens: attention stays inside each document of a window (segment ids
    # from the EOS tokens) and rotary positions restart at each document
    document_mask: bool = False
    # MQAR task
    mqar_vocab_size: int = ranged(256, ">= 1")
    mqar_num_kv_pairs: int = ranged(8, ">= 1")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "lion", "adafactor"] = "adamw"
    learning_rate: float = ranged(3e-3, "> 0")
    weight_decay: float = ranged(0.1, ">= 0")
    b1: float = ranged(0.9, "[0, 1)")
    b2: float = ranged(0.95, "[0, 1)")
    eps: float = ranged(1e-8, "> 0")
    clip_norm: float | None = ranged(1.0, "> 0")
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = ranged(100, ">= 0")
    decay_fraction: float = ranged(0.2, "(0, 1]")  # wsd: final fraction of steps spent decaying
    min_lr_ratio: float = ranged(0.1, "[0, 1]")  # where the decays end; linear with 0: D2Z


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = ranged(1000, ">= 1")
    grad_accum: int = ranged(1, ">= 1")
    seed: int = ranged(0, ">= 0")
    z_loss: float = ranged(0.0, ">= 0")
    eval_every: int = ranged(200, ">= 0")
    eval_batches: int = ranged(8, ">= 1")
    log_every: int = ranged(10, ">= 1")
    out_dir: str = "runs"
    run_name: str | None = None  # None: derived from the config file name
    peak_tflops: float | None = ranged(None, "> 0")  # None: per device kind default
    progress: bool = True
    # a step whose loss or gradient norm is NaN or inf: stop the run (keeping
    # the checkpoints before it), or skip it (params and optimizer state unchanged)
    nonfinite: Literal["stop", "skip"] = "stop"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = ranged(-1, "-1 or >= 1")
    fsdp: int = ranged(1, "-1 or >= 1")
    tensor: int = ranged(1, "-1 or >= 1")
    expert: int = ranged(1, "-1 or >= 1")
    sequence: int = ranged(1, "-1 or >= 1")
    # logical axis -> mesh axis (or list of axes, or null for replicated)
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = ranged(0, ">= 0")  # 0: only at the end
    keep_last: int = ranged(3, ">= 1")
    keep_every: int | None = ranged(None, ">= 1")
    async_save: bool = True
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Text generation (`jaxkit generate`, jaxkit.generate.Generator)."""
    max_new_tokens: int = ranged(128, ">= 1")
    temperature: float = ranged(1.0, ">= 0")  # 0: greedy
    top_k: int = ranged(0, ">= 0")  # 0: no top-k filter
    top_p: float = ranged(1.0, "(0, 1]")  # 1: no nucleus filter
    seed: int = ranged(0, "[0, 4294967295]")  # a uint32 PRNG seed
    stop: tuple[str, ...] = ()  # a sequence's text ends before the first of these it produces
    # prepend the tokenizer's BOS id to every prompt (Llama-family models are
    # trained with it; `jaxkit convert hf-to-jaxkit` sets it from the tokenizer)
    add_bos: bool = False
    # KV cache storage: the compute dtype, a float dtype, int8/fp8 codes
    # with a float32 scale per token and head, or KIVI-2 (2-bit codes)
    kv_cache: Literal["compute", "bf16", "fp16", "fp32", "int8", "fp8", "kivi2"] = "compute"
    paged: bool = False  # pages of page_size tokens from one pool per layer
    page_size: int = ranged(16, ">= 1")
    attention_implementation: Literal["auto", "xla", "pallas", "mosaic_gpu", "blockspec"] = "auto"


# q, k, v, o: attention; gate, up, down: the MLP's (and MoE shared experts')
LoRATarget = Literal["q", "k", "v", "o", "gate", "up", "down"]
LORA_TARGETS = typing.get_args(LoRATarget)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA fine-tuning: low-rank adapters on the named projections of a
    frozen model, the only weights trained (jaxkit.lora)."""
    # The frozen model: a training run directory (its latest intact
    # checkpoint), a `jaxkit export` directory, or, with model.quant.mode
    # 'int' (QLoRA), a `jaxkit quantize --out` directory. null: no LoRA.
    base: str | None = None
    rank: int = ranged(8, ">= 1")
    alpha: float = ranged(16.0, "> 0")  # an adapter adds (alpha / rank) * (x @ A) @ B
    dropout: float = ranged(0.0, "[0, 1)")  # on the adapters' input, in training only
    targets: tuple[LoRATarget, ...] = LORA_TARGETS
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's initialisation; B starts at zero


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


# ---------------------------------------------------------------- loading

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """Check/convert a YAML or command-line value to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(prefix: str, key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else \
        f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(prefix, key, types_)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _convert(value, tp, prefix + key)
    return cls(**kwargs)


def _parse_yaml(text: str, source: str):
    """The YAML document in text; a syntax error is one line naming the source
    and the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None


def _set_nested(tree: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[parts[-1]] = _parse_yaml(raw, f"--set {dotted}") if raw != "" else ""


def _check_override_key(dotted: str) -> None:
    cls, prefix = Config, ""
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(cls)):
            raise ConfigError(f"--set {dotted}: {prefix.rstrip('.')} is not a section")
        types_ = _field_types(cls)
        if part not in types_:
            raise _unknown_key(prefix, part, types_)
        cls, prefix = types_[part], f"{prefix}{part}."


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply ``a.b=value`` overrides, validate, return Config."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} "
                              f"{'is not a file' if path.exists() else 'does not exist'}")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
        tree = _parse_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _check_override_key(key.strip())
        _set_nested(tree, key.strip(), raw.strip())
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
    _require(sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor", "expert", "sequence")) <= 1,
             "at most one mesh axis may be -1")
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


def reference_markdown() -> str:
    """The config reference table (every key, its type, default and range of
    values) for the README."""
    rows = ["| key | type | default | range |", "| --- | --- | --- | --- |"]

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = _field_types(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            type_name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
            type_name = type_name.replace(" | ", " or ")
            valid = f"`{f.metadata['range']}`" if "range" in f.metadata else ""
            rows.append(f"| `{prefix}{f.name}` | `{type_name}` | `{default!r}` | {valid} |")

    walk(Config, "")
    return "\n".join(rows) + "\n"
