"""Quantisation state of one Linear layer and the forward passes it applies.

A Quantizer sits inside a Linear whose target the QuantConfig names. Modes:

* 'qat'  fake-quantise weights/activations every step (clipped straight-
         through gradients), optionally quantise the output gradient, to
         nearest or (gradient_rounding 'stochastic') stochastically with a
         PRNG key each layer keeps in its state and advances every training
         call, so a run (and its resumption) draws the same noise;
* 'ptq'  the same simulated forward, with static per-tensor activation scales
         and SmoothQuant factors taken from calibration (jaxkit.quant.calibrate);
* 'int'  after jaxkit.quant.quantize_model: the weight lives as int8, packed
         int4 or fp8 codes plus scales, and the forward calls a quant_matmul
         kernel.

Hadamard rotation (QuantConfig.hadamard) and SmoothQuant (smoothquant_alpha)
transform x and W along the contraction axis before quantisation so that
x @ W is unchanged in exact arithmetic.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkit.quant.config_check import check_quant_config, int_kernel
from jaxkit.quant.core import fake_quant, quantize, tensor_statistic, ungroup
from jaxkit.quant.formats import get_format
from jaxkit.quant.rotation import random_signs, rotate_activation, rotate_weight
from jaxkit.quant.smoothquant import smooth, smoothing_factors
from pallas_kernels import quant_matmul as qm


class QuantStat(nnx.Variable):
    """A statistic gathered during calibration (never trained)."""


class QuantScale(nnx.Variable):
    """A frozen quantisation constant: rotation signs, calibrated activation
    statistics (never trained)."""


class QuantWeight(nnx.Variable):
    """Low-bit weight storage and its scales (mode 'int')."""


class QuantRng(nnx.Variable):
    """The raw PRNG key of a layer's stochastic gradient rounding, advanced by
    each training call."""


PHASES = ("run", "observe_channels", "observe_activations")


def quant_kwargs(cfg) -> dict:
    """The QuantConfig fields that quantize/fake_quant take as keywords."""
    return {"granularity": cfg.granularity, "block_size": cfg.block_size,
            "scale_method": cfg.scale_method, "percentile": cfg.percentile}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_gradient(y, fmt_name: str, key=None):
    """Identity forward; the backward quantise-dequantises the incoming
    gradient per row (the format's default groups) before it reaches the
    matmul's backward, so both backward matmuls (dx and dW) take it: to
    nearest, or stochastically with noise drawn from ``key`` (a raw or typed
    PRNG key; None: nearest)."""
    return y


def _qg_fwd(y, fmt_name, key):
    return y, key


def _qg_bwd(fmt_name, key, g):
    rounding = "nearest" if key is None else "stochastic"
    return fake_quant(g, fmt_name, axis=-1, rounding=rounding, key=key), None


quantize_gradient.defvjp(_qg_fwd, _qg_bwd)


def side_key(stream: nnx.RngStream) -> jax.Array:
    """A key of its own for each point of a stream (derived from the key the
    stream would give next) that leaves the stream where it is: switching
    stochastic rounding on changes no initial weight."""
    return jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]), 1)


class Quantizer(nnx.Module):
    def __init__(self, in_features: int, out_features: int, cfg, *, rngs: nnx.Rngs):
        check_quant_config(cfg)
        if cfg.mode == "none":
            raise ValueError("a Quantizer needs a quant mode other than 'none'")
        self.cfg = cfg
        self.in_features, self.out_features = in_features, out_features
        self.signs = QuantScale(random_signs(rngs.params(), in_features)) if cfg.hadamard \
            else nnx.data(None)
        stochastic = cfg.gradient_format is not None and cfg.gradient_rounding == "stochastic"
        self.gradient_rng = QuantRng(jax.random.key_data(side_key(rngs.params))) \
            if stochastic else nnx.data(None)
        self.deterministic = True  # nnx's train/eval flag: the key advances in training only
        self.act_channel_max = nnx.data(None)  # QuantScale [in] for SmoothQuant
        self.act_stat = nnx.data(None)  # QuantScale: static per-tensor activation statistic
        self.stats = nnx.data(None)  # QuantStat dict while calibrating
        self.phase = "run"
        self.kernel_kind = None  # mode 'int': which quant_matmul kernel, once converted
        self.storage = nnx.data(None)  # mode 'int': dict of QuantWeight

    # ------------------------------------------------------------ helpers
    def needs_channel_stats(self) -> bool:
        return self.cfg.smoothquant_alpha is not None

    def needs_activation_stats(self) -> bool:
        c = self.cfg
        return c.mode in ("ptq", "int") and c.activation_format is not None \
            and c.granularity == "tensor"

    def smoothing(self, w):
        """SmoothQuant factors s [in] for the float kernel w."""
        if self.act_channel_max is None:
            raise ValueError("smoothquant_alpha is set but the layer is not calibrated; "
                             "run jaxkit.quant.calibrate first")
        return smoothing_factors(self.act_channel_max[...], w, self.cfg.smoothquant_alpha)

    def transform(self, x, w):
        """SmoothQuant then rotation, applied to x [..., in] and W [in, out]
        (float32); x comes back float32. A bf16 x is rotated before any cast:
        fwht multiplies it by the Hadamard matrix exactly in a bf16 GEMM."""
        if self.needs_channel_stats():
            x, w = smooth(x.astype(jnp.float32), w, self.smoothing(w))
        if self.signs is not None:
            x, w = rotate_activation(x, self.signs[...]), rotate_weight(w, self.signs[...])
        return x.astype(jnp.float32), w

    def _static_amax(self):
        if not self.needs_activation_stats():
            return None
        if self.act_stat is None:
            raise ValueError("per-tensor activation scales are static in mode "
                             f"{self.cfg.mode!r}: run jaxkit.quant.calibrate first")
        return self.act_stat[...]

    # ------------------------------------------------------------ calibration
    def begin_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown calibration phase {phase!r}; choose one of {PHASES}")
        self.phase = phase
        if phase == "observe_channels":
            self.stats = {"channel_max": QuantStat(jnp.zeros((self.in_features,), jnp.float32))}
        elif phase == "observe_activations":
            fmt = get_format(self.cfg.activation_format)
            width = 2 if fmt.asymmetric else 1
            self.stats = {"sum": QuantStat(jnp.zeros((width,), jnp.float32)),
                          "max": QuantStat(jnp.zeros((width,), jnp.float32)),
                          "count": QuantStat(jnp.zeros((), jnp.float32))}

    def end_phase(self) -> None:
        if self.phase == "observe_channels":
            self.act_channel_max = QuantScale(self.stats["channel_max"][...])
        elif self.phase == "observe_activations":
            st = self.stats
            if float(st["count"][...]) == 0:
                raise ValueError("calibration saw no batches")
            # absmax: the largest value seen; percentile/mse: the mean per-batch choice
            agg = st["max"][...] if self.cfg.scale_method == "absmax" \
                else st["sum"][...] / st["count"][...]
            fmt = get_format(self.cfg.activation_format)
            self.act_stat = QuantScale(agg if fmt.asymmetric else agg[0])
        self.stats = None
        self.phase = "run"

    def _observe(self, x, w):
        xf = x.astype(jnp.float32)
        if self.phase == "observe_channels":
            cm = self.stats["channel_max"]
            cm[...] = jnp.maximum(cm[...], jnp.max(jnp.abs(xf.reshape(-1, xf.shape[-1])), axis=0))
            return
        xt, _ = self.transform(xf, w.astype(jnp.float32))
        stat = tensor_statistic(xt, self.cfg.activation_format, scale_method=self.cfg.scale_method,
                                percentile=self.cfg.percentile)
        stat = jnp.stack(stat) if isinstance(stat, tuple) else stat[None]
        st = self.stats
        st["sum"][...] = st["sum"][...] + stat
        st["count"][...] = st["count"][...] + 1
        # elementwise: larger amax/hi, and (for the lo of asymmetric formats) more negative lo
        sign = jnp.array([-1.0, 1.0]) if stat.shape[0] == 2 else jnp.ones((1,))
        st["max"][...] = sign * jnp.maximum(sign * st["max"][...], sign * stat)

    # ------------------------------------------------------------ forward
    def __call__(self, x, kernel, compute_dtype):
        """x [..., in] @ the layer's weight: ``kernel`` is the float weight
        array [in, out], or None once converted to low-bit storage."""
        if self.kernel_kind is not None:
            return self._int_forward(x, compute_dtype)
        if kernel is None:
            raise ValueError("this layer has no float kernel; it was converted by quantize_model")
        if self.phase != "run":
            self._observe(x, kernel)
            return jnp.dot(x.astype(compute_dtype), kernel.astype(compute_dtype))
        c = self.cfg
        x, w = self.transform(x, kernel.astype(jnp.float32))
        kw = quant_kwargs(self.cfg)
        if c.weight_format is not None:
            w = fake_quant(w, c.weight_format, axis=0, **kw)
        if c.activation_format is not None:
            x = fake_quant(x, c.activation_format, axis=-1, amax=self._static_amax(), **kw)
        # Output in the compute dtype, as the float Linear's: a float32 output
        # would make the cotangent float32 and both gradient matmuls float32 GEMMs.
        y = jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype))
        if c.gradient_format is not None:
            y = quantize_gradient(y, c.gradient_format, self._gradient_key())
        return y

    def _gradient_key(self):
        """This call's key for stochastic gradient rounding (None: to nearest)."""
        if self.gradient_rng is None:
            return None
        key, sub = jax.random.split(jax.random.wrap_key_data(self.gradient_rng[...]))
        if not self.deterministic:
            self.gradient_rng[...] = jax.random.key_data(key)
        return sub

    # ------------------------------------------------------------ mode 'int'
    def convert(self, kernel) -> None:
        """Quantise the float kernel [in, out] into low-bit storage (mode 'int')."""
        c = self.cfg
        kind = int_kernel(c)
        w = jnp.asarray(kernel, jnp.float32)
        extra = {}
        if self.needs_channel_stats():
            extra["smooth"] = self.smoothing(w)
            w = w * extra["smooth"][:, None]
        if self.signs is not None:
            w = rotate_weight(w, self.signs[...])
        kw = quant_kwargs(self.cfg)
        if kind == "w8a8":
            q = quantize(w.T, "int8", axis=-1, **kw)  # stored [N, K]
            storage = {"codes": ungroup(q, q.codes).astype(jnp.int8),
                       "scale": ungroup(q, q.scale)[:, 0]}
        elif kind == "fp8_blockwise":
            storage = _fp8_weight_blocks(w, kw)
        else:
            q = quantize(w, c.weight_format, axis=0, **kw)
            codes = ungroup(q, q.codes).astype(jnp.int32)
            # per-group arrays [K/g, N]: the first row of each group of the broadcast
            storage = {"codes": qm.pack_int4(codes), "scale": ungroup(q, q.scale)[::c.block_size]}
            if q.zero is not None:
                storage["zero"] = ungroup(q, q.zero)[::c.block_size]
        self.storage = {k: QuantWeight(v) for k, v in {**storage, **extra}.items()}
        self.kernel_kind = kind

    def _int_forward(self, x, compute_dtype):
        c = self.cfg
        st = {k: v[...] for k, v in self.storage.items()}
        if self.needs_channel_stats() or self.signs is not None:
            # rotation/smoothing of x alone: W was transformed at conversion
            x = self._transform_x(x)
        x = x.astype(jnp.float32)
        kw = quant_kwargs(self.cfg)
        if self.kernel_kind == "w8a8":
            q = quantize(x, "int8", axis=-1, amax=self._static_amax(), **kw)
            xs = ungroup(q, q.scale)[..., 0]
            return qm.w8a8_matmul(ungroup(q, q.codes).astype(jnp.int8), xs, st["codes"],
                                  st["scale"], out_dtype=compute_dtype)
        if self.kernel_kind == "fp8_blockwise":
            q = quantize(x, "fp8_e4m3", axis=-1, **kw)
            xs = q.scale[..., 0]  # [..., K/128]
            return qm.fp8_blockwise_matmul(ungroup(q, q.codes).astype(jnp.float8_e4m3fn), xs,
                                           st["codes"], st["scale"], out_dtype=compute_dtype)
        return qm.int4_weight_only_matmul(x.astype(compute_dtype), st["codes"], st["scale"],
                                          st.get("zero"), group_size=c.block_size)

    def _transform_x(self, x):
        """Quantizer.transform's for x alone; float32."""
        if self.needs_channel_stats():
            x = x.astype(jnp.float32) / self.storage["smooth"][...]
        if self.signs is not None:
            x = rotate_activation(x, self.signs[...])
        return x


def _fp8_weight_blocks(w, kw):
    """e4m3 codes [N, K] and 128x128 block scales [ceil(N/128), K/128]
    (DeepSeek-V3) of W [K, N]; a ragged last N block is zero-padded for its scale."""
    K, N = w.shape
    b = 128
    if K % b:
        raise ValueError(f"fp8 blockwise weights need K divisible by {b}, got shape {w.shape}")
    nn = -(-N // b)
    wt = jnp.pad(w.T, ((0, nn * b - N), (0, 0)))  # [N', K]
    blocks = wt.reshape(nn, b, K // b, b).transpose(0, 2, 1, 3).reshape(nn, K // b, b * b)
    q = quantize(blocks, "fp8_e4m3", axis=-1, granularity="channel",
                 scale_method=kw["scale_method"], percentile=kw["percentile"])
    codes = ungroup(q, q.codes).reshape(nn, K // b, b, b).transpose(0, 2, 1, 3).reshape(nn * b, K)
    return {"codes": codes[:N].astype(jnp.float8_e4m3fn), "scale": q.scale[..., 0, 0]}
