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
* mode 'int' keeps the weights as low-bit codes (int8, two int4 codes per
  byte, or fp8 e4m3) plus their group scales and dequantises them into the
  compute dtype for the grouped matmul. No quantised grouped-matmul kernel
  exists yet, so this saves weight memory, not matmul time; the numbers equal
  mode 'ptq' (the same codes, scales and activation quantisation).

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
from jaxkit.quant.core import QTensor, dequantize, fake_quant, quantize
from jaxkit.quant.layer import QuantScale, QuantWeight, quant_kwargs, quantize_gradient
from jaxkit.quant.rotation import random_signs, rotate_activation, rotate_weight
from pallas_kernels.quant_matmul import pack_int4, unpack_int4

MATRICES = ("gate", "up", "down")  # the order of jaxkit.layers.moe.ExpertWeights
WEIGHT_AXIS = 1  # contraction axis of every stacked expert matrix


def check_expert_quant(cfg: QuantConfig) -> None:
    """Raise ValueError for what expert quantisation cannot honour."""
    check_quant_config(cfg)
    fix = "remove 'experts' from model.quant.targets"
    if cfg.smoothquant_alpha is not None:
        raise ValueError(f"smoothquant_alpha is not supported for MoE experts ({fix})")
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
    # False in mode 'int': the weights arrive dequantised, already rotated
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
            x = rotate_activation(x.astype(jnp.float32), signs)
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


def _int_codes(q: QTensor) -> jax.Array:
    """Integer codes of an integer-format QTensor (its codes are code * step)."""
    return jnp.round(q.codes / q.fmt.element.step).astype(jnp.int32)


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
        self.layout = nnx.data(None)  # mode 'int': {matrix: QTensor of shapes (static info)}

    def _signs(self, name):
        s = self.signs_hidden if name == "down" else self.signs_in
        return None if s is None else s[...]

    def quant(self) -> ExpertQuant:
        """The pure quantisation the expert FFN applies (see ExpertQuant)."""
        return ExpertQuant(self._signs("gate"), self._signs("down"), self.cfg,
                           fake_quant_weights=self.storage is None)

    def stored_weights(self):
        """(gate, up, down) dequantised from low-bit storage (mode 'int')."""
        if self.storage is None:
            raise ValueError("the experts have neither float weights nor low-bit storage")
        return tuple(self._dequantized(name) for name in MATRICES)

    # ------------------------------------------------------------ mode 'int'
    def convert(self, float_weights) -> None:
        """Quantise (gate, up, down) into low-bit storage (cfg.mode 'int')."""
        kind = int_kernel(self.cfg)
        storage, layout = {}, {}
        for name, w in zip(MATRICES, float_weights, strict=True):
            q = quantize(rotate_experts(w, self._signs(name)), self.cfg.weight_format,
                         axis=WEIGHT_AXIS,
                         **quant_kwargs(self.cfg))
            if kind == "fp8_blockwise":
                codes = q.codes.astype(jnp.float8_e4m3fn)  # exact: codes lie on the e4m3 grid
            elif kind == "w8a8":
                codes = _int_codes(q).astype(jnp.int8)
            else:  # int4: two codes per byte, over the flattened codes
                codes = pack_int4(_int_codes(q).reshape(2, -1))
            st = {"codes": codes, "scale": q.scale}
            if q.zero is not None:
                st["zero"] = q.zero
            storage[name] = {k: QuantWeight(v) for k, v in st.items()}
            layout[name] = (q.fmt, q.axis, q.shape, q.codes.shape)
        self.storage, self.layout = storage, layout

    def _dequantized(self, name):
        fmt, axis, shape, grouped = self.layout[name]
        st = {k: v[...] for k, v in self.storage[name].items()}
        codes = st["codes"]
        if codes.dtype == jnp.uint8:
            codes = unpack_int4(codes, signed=not fmt.asymmetric)
        codes = codes.astype(jnp.float32).reshape(grouped)
        if fmt.element.kind == "int":
            codes = codes * fmt.element.step
        return dequantize(QTensor(codes, st["scale"], st.get("zero"), None, fmt, axis, shape))
