"""Training memory of one sequence of S tokens on one GPU, estimated from the
config's shapes: which models fit at 128k tokens with dense flash attention,
block-sparse attention (its selection's transient buffers added) or the
linear-attention mixer. Estimates only; the compiled figure of a config comes
from one training step on the GPU (the trainer logs XLA's plan as the compile
record's arguments_gib + temporaries_gib):

    python -m experiments.long_context_retrieval.memory [--seq-len 131072] [--gib 80]
    jaxkit train CONFIG --set data.seq_len=131072 --set data.batch_size=1 \\
        --set model.max_seq_len=131072 --set train.steps=2 --set train.eval_every=0

Model per layer, B = 1, bf16 compute, fp32 params:
  weights, gradients, AdamW moments   16 bytes a parameter;
  saved activations (remat none)      2 bytes x (4 d + 2 Hq D + 2 Hkv D + 3 F) a
                                      token (norm inputs, q, k, v, attention
                                      out, MLP gate, up and product) + 4 Hq
                                      (the softmax log-sum-exp);
  remat full                          2 d a token (the layer input) plus one
                                      layer's activations while it recomputes;
  logits                              float32 S x vocab (kept for the loss);
  sparse selection (one layer live)   4 Hq (S/bs)^2 pooled scores, twice for the
                                      top-k working copy, + the int32 lists and
                                      their transposed (CSR) copy in the backward;
  linear mixer                        float32 chunk states 4 H D^2 S / chunk a
                                      layer instead of the log-sum-exp.
"""
from __future__ import annotations

import argparse
import dataclasses

from jaxkit.config import ModelConfig

GIB = 2 ** 30
MODELS = {  # name: ModelConfig overrides (the shapes of configs/ and of mqar_long.yaml)
    "mqar_long": dict(d_model=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                      mlp_hidden=256, vocab_size=1027),
    "gpt_125m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                     mlp_hidden=3328, vocab_size=259),
    "dense_1b": dict(d_model=2048, num_layers=22, num_heads=16, num_kv_heads=4,
                     mlp_hidden=5632, vocab_size=32000),
}
MIXERS = ("dense", "sparse k16", "sparse k64", "linear")


def param_count(m: ModelConfig) -> int:
    d, D, F = m.d_model, m.dim_per_head, m.mlp_hidden
    attn = d * (m.num_heads + 2 * m.kv_heads) * D + m.num_heads * D * d
    per_layer = attn + 3 * d * F + 2 * d
    return m.num_layers * per_layer + m.vocab_size * d * (1 if m.tie_embeddings else 2) + d


def estimate(m: ModelConfig, S: int, mixer: str, remat: str, block: int = 64,
             chunk: int = 64) -> dict:
    """Bytes by part for one sequence of S tokens."""
    d, D, F, H, KH, L = (m.d_model, m.dim_per_head, m.mlp_hidden, m.num_heads, m.kv_heads,
                         m.num_layers)
    layer_tokens = 2 * (4 * d + 2 * H * D + 2 * KH * D + 3 * F) * S
    extra = 4 * H * S if mixer != "linear" else 4 * H * D * D * (S // chunk)
    per_layer = layer_tokens + extra
    saved = L * per_layer if remat == "none" else L * 2 * d * S + per_layer
    parts = {"weights+grads+adam": 16 * param_count(m), "activations": saved,
             "logits": 4 * S * m.vocab_size}
    if mixer.startswith("sparse"):
        n = -(-S // block)
        top_k = int(mixer.split("k")[1])
        parts["selection"] = 2 * 4 * H * n * n + 3 * 4 * KH * n * top_k
    return parts


def table(S: int, gib: float) -> str:
    lines = [f"| model | params | mixer | remat | GiB (estimate) | fits {gib:g} GiB |",
             "| --- | ---: | --- | --- | ---: | --- |"]
    for name, over in MODELS.items():
        m = dataclasses.replace(ModelConfig(), **over)
        millions = param_count(m) / 1e6
        params = f"{millions:.{0 if millions >= 10 else 2}f}M"
        for mixer in MIXERS:
            for remat in ("none", "full"):
                total = sum(estimate(m, S, mixer, remat).values()) / GIB
                fits = "yes" if total < 0.9 * gib else "no"  # 10% for XLA's own buffers
                lines.append(f"| {name} | {params} | {mixer} | {remat} | {total:.1f} | {fits} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--gib", type=float, default=80.0)
    args = p.parse_args(argv)
    print(table(args.seq_len, args.gib), end="")


if __name__ == "__main__":
    main()
