"""Hugging Face tensors (names as in a Llama, Mistral or Mixtral
model.safetensors) <-> jaxkit parameters (flat paths of an unscanned
Transformer's nnx state), both ways through one table of correspondences.

HF linear weights are [out, in] and jaxkit kernels [in, out]: a transpose,
nothing else. In particular no rotary permutation of q and k: jaxkit rotates
the two halves of each head (rotate-half), as transformers' Llama does, and
checkpoints in the HF layout (converted from Meta's interleaved-pair layout
by HF's conversion script) are already permuted for it. Heads sit in the
same order (query head h reads key-value head h // (heads / kv_heads)).
Mixtral's per-expert w1 (gate), w3 (up) and w2 (down) are stacked into
jaxkit's [experts, ...] arrays. Pure functions on numpy arrays."""
from __future__ import annotations

from typing import NamedTuple

import ml_dtypes  # installed with jax; numpy has no bfloat16 of its own
import numpy as np

from jaxkit.config import ModelConfig
from jaxkit.interop.errors import ConversionError

Path = tuple  # a flat nnx state path, e.g. ("blocks", 0, "attn", "q", "kernel")
# Buffers some checkpoints carry that the model recomputes
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class Entry(NamedTuple):
    hf_name: str
    path: Path
    hf_shape: tuple[int, ...]
    transpose: bool  # HF [out, in] against jaxkit [in, out]
    expert: int | None = None  # index into the jaxkit array's leading experts axis


def _linear(hf_name: str, path: Path, d_in: int, d_out: int, expert=None) -> Entry:
    return Entry(hf_name, path, (d_out, d_in), True, expert)


def tensor_table(m: ModelConfig) -> list[Entry]:
    """Every HF tensor of m's model and where it lives in jaxkit."""
    D, hd = m.d_model, m.dim_per_head
    q_dim, kv_dim = m.num_heads * hd, m.kv_heads * hd
    table = [Entry("model.embed_tokens.weight", ("embed",), (m.vocab_size, D), False),
             Entry("model.norm.weight", ("final_norm", "scale"), (D,), False)]
    if not m.tie_embeddings:
        table.append(_linear("lm_head.weight", ("head", "kernel"), D, m.vocab_size))
    for i in range(m.num_layers):
        hf, jk = f"model.layers.{i}.", ("blocks", i)
        table += [
            Entry(hf + "input_layernorm.weight", (*jk, "attn_norm", "scale"), (D,), False),
            Entry(hf + "post_attention_layernorm.weight", (*jk, "mlp_norm", "scale"), (D,),
                  False),
            _linear(hf + "self_attn.q_proj.weight", (*jk, "attn", "q", "kernel"), D, q_dim),
            _linear(hf + "self_attn.k_proj.weight", (*jk, "attn", "k", "kernel"), D, kv_dim),
            _linear(hf + "self_attn.v_proj.weight", (*jk, "attn", "v", "kernel"), D, kv_dim),
            _linear(hf + "self_attn.o_proj.weight", (*jk, "attn", "o", "kernel"), q_dim, D),
        ]
        if m.is_moe_layer(i):
            H, moe = m.moe.expert_hidden, hf + "block_sparse_moe."
            table.append(_linear(moe + "gate.weight", (*jk, "mlp", "router"), D,
                                 m.moe.num_experts))
            for e in range(m.moe.num_experts):
                ex = f"{moe}experts.{e}."
                table += [_linear(ex + "w1.weight", (*jk, "mlp", "gate"), D, H, e),
                          _linear(ex + "w3.weight", (*jk, "mlp", "up"), D, H, e),
                          _linear(ex + "w2.weight", (*jk, "mlp", "down"), H, D, e)]
        else:
            H = m.mlp_hidden
            table += [_linear(hf + "mlp.gate_proj.weight", (*jk, "mlp", "gate", "kernel"), D, H),
                      _linear(hf + "mlp.up_proj.weight", (*jk, "mlp", "up", "kernel"), D, H),
                      _linear(hf + "mlp.down_proj.weight", (*jk, "mlp", "down", "kernel"), H, D)]
    return table


def _check_names(tensors: dict, table: list[Entry], m: ModelConfig) -> None:
    names = {e.hf_name for e in table}
    missing = [e.hf_name for e in table if e.hf_name not in tensors]
    if missing:
        raise ConversionError(f"the weights lack {len(missing)} tensor(s) the config describes, "
                              f"first {missing[0]!r}")
    extra = sorted(n for n in tensors if n not in names and not n.endswith(IGNORED_SUFFIXES)
                   and not (m.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise ConversionError(f"the weights hold {len(extra)} tensor(s) the config does not "
                              f"describe, first {extra[0]!r}")


def params_from_hf(tensors: dict[str, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """The jaxkit parameters (flat paths -> arrays in m.param_dtype) of an HF
    checkpoint's tensors, checked name by name and shape by shape against
    the model m describes."""
    table = tensor_table(m)
    _check_names(tensors, table, m)
    if m.tie_embeddings and "lm_head.weight" in tensors and not np.array_equal(
            tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
        raise ConversionError("tie_word_embeddings is true but lm_head.weight differs from "
                              "model.embed_tokens.weight")
    dtype = PARAM_DTYPES[m.param_dtype]
    params, stacks = {}, {}
    for e in table:
        value = tensors[e.hf_name]
        if value.shape != e.hf_shape:
            raise ConversionError(f"tensor {e.hf_name!r} has shape {list(value.shape)}, the "
                                  f"config describes {list(e.hf_shape)}")
        value = (value.T if e.transpose else value).astype(dtype)
        if e.expert is None:
            params[e.path] = value
        else:
            stacks.setdefault(e.path, []).append(value)
    for path, experts in stacks.items():
        params[path] = np.stack(experts)
    return params


def hf_from_params(params: dict[Path, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """The HF tensors of jaxkit parameters (flat paths of an unscanned
    Transformer of config m; the paths must be exactly the table's)."""
    table = tensor_table(m)
    paths = {e.path for e in table}
    if set(params) != paths:
        odd = sorted(map(str, set(params) ^ paths))
        raise ConversionError(f"the parameters do not match the model the config describes, "
                              f"first differing path {odd[0]}")
    tensors = {}
    for e in table:
        value = np.asarray(params[e.path])
        if e.expert is not None:
            value = value[e.expert]
        tensors[e.hf_name] = np.ascontiguousarray(value.T if e.transpose else value)
        if tensors[e.hf_name].shape != e.hf_shape:
            raise ConversionError(f"parameter {'/'.join(map(str, e.path))} gives {e.hf_name!r} "
                                  f"shape {list(tensors[e.hf_name].shape)}, expected "
                                  f"{list(e.hf_shape)}")
    return tensors
