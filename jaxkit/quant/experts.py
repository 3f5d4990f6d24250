"""Quantisation of a MoE layer's routed experts (quant target 'experts').

The experts are three stacked matrices, gate/up [E, D, H] and down [E, H, D],
multiplied by grouped (or batched) matmuls rather than Linear layers, so they
get their own quantizer with the Linear one's semantics:

* weights are quantised per expert along their contraction axis (axis 1), in
  the configured format, granularity and scale method;
* the rows entering each expert matmul (tokens for gate/up, the SwiGLU hidden
  state for down) are quantised along their last axis, with dynamic scales;
* 'hadamard' rotates both contraction dimensions (D and H) with their own
  random signs; 'gradient_format' quantises each expert matmul's output
  gradient (QAT);
* mode 'int' keeps each matrix as low-bit codes plus scales in the layout of
  pallas_kernels.quant_grouped_matmul (LowBitExperts: int8 [E, K, N] with
  per-channel scales, fp8 e4m3 [E, K, N] with 1x128 scales along K, or int4
  packed [E, N, K/2] with group scales and, for int4_asym, zero points). The
  grouped (dropless) path multiplies the codes directly with
  quant_grouped_matmul.qgmm, which dequantises tile by tile inside its
  kernel; the dense-buffer path (capacity and expert-choice dispatch)
  dequantises the whole stacks, then runs a batched matmul. The numbers equal
  mode 'ptq' (the same codes, scales and activation quantisation) up to
  float rounding.

  Which layouts reach the kernel (LowBitExperts.grouped_matmul): every one
  whose scale group gs (K for int8, 128 for fp8, block_size for int4) has a
  power-of-two divisor >= 16 (>= 32 for int4), with the MoE's
  gmm_implementation 'pallas' (the kernel; interpreted off GPU), 'auto' (the
  kernel on GPU, its jnp reference elsewhere) or 'xla' (the reference). The
  rest dequantise the stacks and call grouped_matmul.gmm with the same
  implementation: int4 with block_size 16, int8 whose K (d_model or
  expert_hidden) has no such divisor, and any layout under 'ragged_dot'
  (there is no quantised ragged_dot).

Not available for experts (a clear error, never ignored): SmoothQuant and
static per-tensor activation scales, both of which need per-expert
calibration statistics.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.config import QuantConfig
from jaxkit.quant.config_check import check_quant_config, int_kernel
from jaxkit.quant.core import QTensor, fake_quant, quantize, ungroup
from jaxkit.quant.layer import QuantScale, QuantWeight, quant_kwargs, quantize_gradient
from jaxkit.quant.rotation import random_signs, rotate_activation, rotate_weight
from pallas_kernels.grouped_matmul import gmm
from pallas_kernels.quant_grouped_matmul import IMPLEMENTATIONS as QGMM_IMPLEMENTATIONS
from pallas_kernels.quant_grouped_matmul import (dequantize_groups, pack_int4_groups, qgmm,
                                                 unsupported)

MATRICES = ("gate", "up", "down")  # the order of jaxkit.layers.moe.ExpertWeights
WEIGHT_AXIS = 1  # contraction axis of every stacked expert matrix
# mode 'int': the quant_matmul kernel kind of the config -> the qgmm kind
QGMM_KIND = {"w8a8": "int8", "fp8_blockwise": "fp8", "int4_weight_only": "int4"}


def check_expert_quant(cfg: QuantConfig) -> None:
    """Raise ValueError for what expert quantisation cannot honour."""
    check_quant_config(cfg)
    fix = "remove 'experts' from model.quant.targets"
    if cfg.smoothquant_alpha is not None:
        raise ValueError(f"smoothquant_alpha is not supported for MoE experts ({fix})")
    if cfg.gradient_rounding != "nearest":
        raise ValueError(f"gradient_rounding {cfg.gradient_rounding!r} is not supported for MoE "
                         f"experts ({fix}, or use gradient_rounding 'nearest')")
    if cfg.mode in ("ptq", "int") and cfg.activation_format is not None \
            and cfg.granularity == "tensor":
        raise ValueError("MoE experts quantise activations with dynamic scales; static "
                         f"per-tensor scales (granularity 'tensor' in mode {cfg.mode!r}) are "
                         f"not supported ({fix}, or use granularity 'token'/'block')")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertQuant:
    """The quantisation the expert FFN applies where its weights are at hand
    (inside shard_map under expert parallelism, on whole per-expert
    matrices). A pytree whose leaves are the rotation signs, so it crosses
    shard_map like the weights."""
    signs_in: jax.Array | None  # [D]: rotation of the gate/up contraction
    signs_hidden: jax.Array | None  # [H]: rotation of the down contraction
    cfg: QuantConfig = dataclasses.field(metadata={"static": True})
    # False in mode 'int': the weights arrive as LowBitExperts, already rotated
    fake_quant_weights: bool = dataclasses.field(default=True, metadata={"static": True})

    def _signs(self, name):
        return self.signs_hidden if name == "down" else self.signs_in

    def weights(self, w):
        """(gate, up, down) as the matmuls use them: rotated along the
        contraction axis and fake-quantised (per expert)."""
        if not self.fake_quant_weights:
            return w
        fmt, out = self.cfg.weight_format, []
        for name, m in zip(MATRICES, w, strict=True):
            m = rotate_experts(m, self._signs(name))
            out.append(m if fmt is None else
                       fake_quant(m, fmt, axis=WEIGHT_AXIS, **quant_kwargs(self.cfg)))
        return type(w)(*out)

    def _apply(self, x, signs):
        if signs is not None:
            x = rotate_activation(x, signs)
        if self.cfg.activation_format is not None:
            x = fake_quant(x, self.cfg.activation_format, axis=-1, **quant_kwargs(self.cfg))
        return x

    def inputs(self, rows):
        """Token rows [..., D] before the gate/up matmuls."""
        return self._apply(rows, self.signs_in)

    def hidden(self, h):
        """SwiGLU hidden rows [..., H] before the down matmul."""
        return self._apply(h, self.signs_hidden)

    def outputs(self, y):
        """A matmul's output: its gradient is quantised on the way back (QAT)."""
        fmt = self.cfg.gradient_format
        return y if fmt is None else quantize_gradient(y, fmt)


def rotate_experts(w, signs):
    """R^T W along the contraction axis of stacked expert matrices [E, in, out]
    (float32); w unchanged (as float32) when signs is None."""
    w = w.astype(jnp.float32)
    return w if signs is None else jax.vmap(rotate_weight, in_axes=(0, None))(w, signs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowBitExperts:
    """One stacked expert matrix [E, K, N] in low-bit storage, in the layout of
    pallas_kernels.quant_grouped_matmul. A pytree whose arrays all lead with
    the expert axis, so it shards along it (expert parallelism) like the
    float weights."""
    codes: jax.Array  # int8 / e4m3 [E, K, N], or int4 packed uint8 [E, N, K/2]
    scales: jax.Array  # float32 [E, K/gs, N]
    zeros: jax.Array | None  # int4_asym: zero points [E, K/gs, N]
    kind: str = dataclasses.field(metadata={"static": True})  # qgmm kind

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical [E, K, N] of the float matrix."""
        e, a, b = self.codes.shape
        return (e, 2 * b, a) if self.kind == "int4" else (e, a, b)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    def dequantize(self) -> jax.Array:
        """float32 [E, K, N]."""
        return dequantize_groups(self.codes, self.scales, self.zeros, kind=self.kind,
                                 group_size=self.group_size)

    def grouped_matmul(self, lhs, group_sizes, *, implementation: str) -> jax.Array:
        """lhs [M, K] rows grouped by expert -> [M, N] float32, through the
        qgmm kernel where the layout and implementation allow (module
        docstring), else dequantised weights and grouped_matmul.gmm."""
        # qgmm takes the MoE's implementation names but 'ragged_dot'
        if implementation not in QGMM_IMPLEMENTATIONS or unsupported(self.kind, self.group_size):
            return gmm(lhs, self.dequantize().astype(lhs.dtype), group_sizes,
                       implementation=implementation, preferred_element_type=jnp.float32)
        return qgmm(lhs, self.codes, self.scales, group_sizes, kind=self.kind,
                    group_size=self.group_size, zeros=self.zeros, implementation=implementation,
                    preferred_element_type=jnp.float32)


def _int_codes(q: QTensor) -> jax.Array:
    """Integer codes [..] of an integer-format QTensor in its original layout
    (its grouped codes are code * step)."""
    return jnp.round(ungroup(q, q.codes) / q.fmt.element.step).astype(jnp.int32)


def _per_group(q: QTensor, a) -> jax.Array:
    """A per-group array of q ([E, N, K/gs, 1], quantised along axis 1) as
    [E, K/gs, N] float32."""
    return jnp.swapaxes(a[..., 0], 1, 2).astype(jnp.float32)


class ExpertQuantizer(nnx.Module):
    def __init__(self, d_model: int, hidden: int, cfg: QuantConfig, *, rngs: nnx.Rngs):
        check_expert_quant(cfg)
        if cfg.mode == "none":
            raise ValueError("an ExpertQuantizer needs a quant mode other than 'none'")
        self.cfg = cfg
        signs = lambda n: QuantScale(random_signs(rngs.params(), n)) if cfg.hadamard \
            else nnx.data(None)
        self.signs_in, self.signs_hidden = signs(d_model), signs(hidden)
        self.storage = nnx.data(None)  # mode 'int': {matrix: {name: QuantWeight}}
        self.kind = None  # mode 'int': the qgmm kind of the storage

    def _signs(self, name):
        s = self.signs_hidden if name == "down" else self.signs_in
        return None if s is None else s[...]

    def quant(self) -> ExpertQuant:
        """The pure quantisation the expert FFN applies (see ExpertQuant)."""
        return ExpertQuant(self._signs("gate"), self._signs("down"), self.cfg,
                           fake_quant_weights=self.storage is None)

    def stored_weights(self):
        """(gate, up, down) as LowBitExperts (mode 'int')."""
        if self.storage is None:
            raise ValueError("the experts have neither float weights nor low-bit storage")
        return tuple(LowBitExperts(st["codes"][...], st["scale"][...],
                                   st["zero"][...] if "zero" in st else None, self.kind)
                     for st in (self.storage[name] for name in MATRICES))

    # ------------------------------------------------------------ mode 'int'
    def convert(self, float_weights) -> None:
        """Quantise (gate, up, down) into low-bit storage (cfg.mode 'int')."""
        kind = QGMM_KIND[int_kernel(self.cfg)]
        storage = {}
        for name, w in zip(MATRICES, float_weights, strict=True):
            q = quantize(rotate_experts(w, self._signs(name)), self.cfg.weight_format,
                         axis=WEIGHT_AXIS, **quant_kwargs(self.cfg))
            if kind == "fp8":  # exact: the codes lie on the e4m3 grid
                codes = ungroup(q, q.codes).astype(jnp.float8_e4m3fn)
            elif kind == "int8":
                codes = _int_codes(q).astype(jnp.int8)
            else:
                codes = pack_int4_groups(_int_codes(q))
            st = {"codes": codes, "scale": _per_group(q, q.scale)}
            if q.zero is not None:
                st["zero"] = _per_group(q, q.zero)
            storage[name] = {k: QuantWeight(v) for k, v in st.items()}
        self.storage, self.kind = storage, kind
