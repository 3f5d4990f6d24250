"""The config's sections: frozen dataclasses whose fields carry their types,
defaults and accepted ranges."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal


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
    # 2: the Hopper grouped matmuls with two consumer warpgroups (Mosaic GPU only)
    gmm_consumers: int = ranged(1, "[1, 2]")
    # with gmm_consumers 2: the two warpgroups take whole gmm items in turn
    # (one's epilogue overlaps the other's products) instead of splitting each
    gmm_pingpong: bool = False
    # the row gathers between token and expert order (pallas_kernels.row_gather;
    # 'auto': XLA's until a GPU benchmark shows the kernel faster)
    permute_implementation: Literal["auto", "xla", "pallas", "blockspec"] = "auto"


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
    # the blocks' and the final norm's pallas_kernels.rms_norm implementation
    # ('auto': XLA's fusions until a GPU benchmark shows the kernel faster)
    norm_implementation: Literal["auto", "xla", "pallas"] = "auto"
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
    # queries a sequence asks (null: one per pair); more queries put more
    # supervised tokens in every sequence
    mqar_num_queries: int | None = ranged(None, ">= 1")
    # each query picks its pair at random (repeats allowed); false: every pair
    # asked once, whose last queries elimination answers without recall
    mqar_repeat_queries: bool = True


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
    # the first moment's storage (adamw, lion); bfloat16 halves its bytes in
    # the update, which reads and writes every moment each step
    mu_dtype: Literal["float32", "bfloat16"] = "float32"
    # float32 copies of bfloat16 parameters (model.param_dtype) in the
    # optimizer state, updated in float32 and rounded into the parameters: the
    # step reads bf16 weights and gradients without casting them each step
    master_weights: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = ranged(1000, ">= 1")
    grad_accum: int = ranged(1, ">= 1")
    seed: int = ranged(0, ">= 0")
    z_loss: float = ranged(0.0, ">= 0")
    # where the training loss's GEMM stores each chunk of logits (the softmax
    # runs in float32 either way); bfloat16 halves the bytes the loss's passes
    # over [tokens, vocab] read and write. Evaluation always uses float32.
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
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
    # a run directory whose latest intact checkpoint's parameters the run
    # starts from, with a fresh optimizer (its own checkpoint, once it has
    # one, wins on --resume); null: a random initialisation
    init_from: str | None = None


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


