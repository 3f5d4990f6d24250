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
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key, value or combination that cannot be run."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    implementation: Literal["auto", "xla", "cudnn", "pallas", "mosaic_gpu", "blockspec"] = "auto"
    sliding_window: int | None = None
    logit_softcap: float | None = None


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 0  # 0: dense MLP everywhere
    every: int = 1  # an MoE layer replaces the MLP in every k-th layer
    first_layer: int = 0  # index of the first MoE layer
    top_k: int = 2
    expert_hidden: int = 256
    num_shared_experts: int = 0
    router: Literal["topk_softmax", "sigmoid_bias", "expert_choice", "grouped"] = "topk_softmax"
    renormalize: bool = True  # softmax routers: chosen weights sum to 1 (Mixtral); false: raw (Switch)
    num_groups: int = 1  # for router: grouped
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    bias_update_rate: float = 0.001  # aux-loss-free balancing (sigmoid_bias)
    gmm_implementation: Literal["auto", "xla", "ragged_dot", "pallas", "mosaic_gpu",
                                "blockspec"] = "auto"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    mode: Literal["none", "qat", "ptq", "int"] = "none"  # int: real low-bit storage
    weight_format: str | None = None  # e.g. int8, int4, fp8_e4m3, mxfp4, nvfp4
    activation_format: str | None = None
    gradient_format: str | None = None
    # None: the format's own groups (per-channel weights and per-token
    # activations for scalar formats, the fixed blocks of MX/NV formats)
    granularity: Literal["tensor", "channel", "token", "block"] | None = None
    block_size: int | None = None
    scale_method: Literal["absmax", "percentile", "mse"] = "absmax"
    percentile: float = 99.9
    targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "experts")
    hadamard: bool = False
    smoothquant_alpha: float | None = None
    calibration_batches: int = 4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 259
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: equal to num_heads
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_hidden: int = 1024
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    remat: Literal["none", "full", "save_dots"] = "none"
    scan_layers: bool = False
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        m = self.moe
        return m.num_experts > 0 and layer >= m.first_layer and (layer - m.first_layer) % m.every == 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: Literal["tokens", "mqar"] = "tokens"
    path: str = "data_cache/stdlib"  # token-file directory with train/val files
    seq_len: int = 256
    batch_size: int = 16  # global batch, in sequences
    seed: int = 0
    # tokens: attention stays inside each document of a window (segment ids
    # from the EOS tokens) and rotary positions restart at each document
    document_mask: bool = False
    # MQAR task
    mqar_vocab_size: int = 256
    mqar_num_kv_pairs: int = 8


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "lion", "adafactor"] = "adamw"
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    min_lr_ratio: float = 0.1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    z_loss: float = 0.0
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    out_dir: str = "runs"
    run_name: str | None = None  # None: derived from the config file name
    peak_tflops: float | None = None  # None: per device kind default
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    sequence: int = 1
    # logical axis -> mesh axis (or list of axes, or null for replicated)
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 3
    keep_every: int | None = None
    async_save: bool = True
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


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


def _set_nested(tree: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


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
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
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


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express (those that need
    no other package)."""
    m = cfg.model
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_hidden", "max_seq_len"):
        _require(getattr(m, name) > 0, f"model.{name} must be > 0, got {getattr(m, name)}")
    _require(m.head_dim is not None or m.d_model % m.num_heads == 0,
             f"model.num_heads ({m.num_heads}) must divide model.d_model ({m.d_model}) "
             "unless model.head_dim is set")
    _require(m.kv_heads > 0 and m.num_heads % m.kv_heads == 0,
             f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    _require(m.dim_per_head % 2 == 0, f"head dim {m.dim_per_head} must be even for rotary embeddings")
    a = m.attention
    _require(a.sliding_window is None or a.sliding_window >= 1,
             f"model.attention.sliding_window must be >= 1, got {a.sliding_window}")
    _require(a.logit_softcap is None or a.logit_softcap > 0,
             f"model.attention.logit_softcap must be > 0, got {a.logit_softcap}")
    e = m.moe
    if e.num_experts:
        _require(e.num_experts > 0, f"model.moe.num_experts must be >= 0, got {e.num_experts}")
        _require(1 <= e.top_k <= e.num_experts,
                 f"model.moe.top_k ({e.top_k}) must be in [1, num_experts={e.num_experts}]")
        _require(e.every >= 1, f"model.moe.every must be >= 1, got {e.every}")
        _require(0 <= e.first_layer < m.num_layers,
                 f"model.moe.first_layer ({e.first_layer}) must be < num_layers ({m.num_layers})")
        _require(e.num_groups >= 1 and e.num_experts % e.num_groups == 0,
                 f"model.moe.num_groups ({e.num_groups}) must divide num_experts ({e.num_experts})")
        if e.router == "grouped":
            _require(e.top_k % e.num_groups == 0,
                     f"model.moe.top_k ({e.top_k}) must be a multiple of num_groups ({e.num_groups}) "
                     "for the grouped router")
        _require(e.capacity_factor > 0, f"model.moe.capacity_factor must be > 0, got {e.capacity_factor}")
        _require(e.expert_hidden > 0 and e.num_shared_experts >= 0,
                 f"model.moe.expert_hidden ({e.expert_hidden}) must be > 0 and num_shared_experts "
                 f"({e.num_shared_experts}) >= 0")
        _require(e.num_groups == 1 or e.router == "grouped",
                 f"model.moe.num_groups ({e.num_groups}) needs router: grouped, got {e.router!r}")
        _require(e.router != "expert_choice" or e.dispatch == "capacity",
                 "model.moe.router 'expert_choice' gives every expert a fixed number of tokens: "
                 f"it needs dispatch: capacity, got {e.dispatch!r}")
        _require(e.bias_update_rate >= 0,
                 f"model.moe.bias_update_rate must be >= 0, got {e.bias_update_rate}")
    d = cfg.data
    _require(d.seq_len > 0 and d.batch_size > 0, f"data.seq_len ({d.seq_len}) and data.batch_size "
             f"({d.batch_size}) must be > 0")
    _require(d.seq_len <= m.max_seq_len,
             f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    _require(not d.document_mask or d.kind == "tokens",
             f"data.document_mask applies to data.kind 'tokens', not {d.kind!r}")
    _require(not d.document_mask or a.implementation != "cudnn",
             "data.document_mask needs segment ids, which model.attention.implementation "
             "'cudnn' does not take; use 'pallas', 'xla' or 'auto'")
    o = cfg.optimizer
    _require(o.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(0 < o.decay_fraction <= 1, f"optimizer.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    t = cfg.train
    _require(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    _require(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _require(d.batch_size % t.grad_accum == 0,
             f"train.grad_accum ({t.grad_accum}) must divide data.batch_size ({d.batch_size})")
    _require(t.eval_every >= 0 and t.log_every >= 1,
             f"train.eval_every ({t.eval_every}) must be >= 0 and train.log_every ({t.log_every}) >= 1")
    for axis in ("data", "fsdp", "tensor", "expert", "sequence"):
        size = getattr(cfg.mesh, axis)
        _require(size == -1 or size >= 1, f"mesh.{axis} must be -1 or >= 1, got {size}")
    _require(sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor", "expert", "sequence")) <= 1,
             "at most one mesh axis may be -1")
    c = cfg.checkpoint
    _require(c.every >= 0 and c.keep_last >= 1,
             f"checkpoint.every ({c.every}) must be >= 0 and checkpoint.keep_last ({c.keep_last}) >= 1")


def reference_markdown() -> str:
    """The config reference table (every key, its type and default) for the README."""
    rows = ["| key | type | default |", "| --- | --- | --- |"]

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = _field_types(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            type_name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
            type_name = type_name.replace(" | ", " or ")
            rows.append(f"| `{prefix}{f.name}` | `{type_name}` | `{default!r}` |")

    walk(Config, "")
    return "\n".join(rows) + "\n"
