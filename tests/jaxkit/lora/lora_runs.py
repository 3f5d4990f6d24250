"""Tiny LoRA runs for the tests: a two-layer float32 model on the MQAR task
(synthetic, no files), its base run, and a one-batch task to fit."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkit.config import load_config
from jaxkit.run.build import build_data
from jaxkit.run.trainer import Trainer

TINY = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.mlp_hidden=48", "model.max_seq_len=32", "model.compute_dtype=float32",
        "data.kind=mqar", "data.seq_len=32", "data.batch_size=8", "data.mqar_vocab_size=64",
        "data.mqar_num_kv_pairs=4", "train.eval_every=0", "train.progress=false",
        "train.log_every=1", "optimizer.warmup_steps=2", "checkpoint.async_save=false"]
LORA = ["lora.rank=4", "lora.alpha=8", "optimizer.learning_rate=1e-2",
        "optimizer.schedule=constant", "optimizer.weight_decay=0"]
QUANT = {
    "int8": ["model.quant.mode=int", "model.quant.weight_format=int8",
             "model.quant.activation_format=int8", "model.quant.hadamard=true"],
    "int4": ["model.quant.mode=int", "model.quant.weight_format=int4",
             "model.quant.granularity=block", "model.quant.block_size=16"],
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)


class OneBatch:
    """A data source that serves its source's first batch at every step: a
    task a few adapter updates fit."""

    def __init__(self, source):
        self.source = source

    def batch(self, step, **kw):
        return self.source.batch(0, **kw)


def config(*overrides):
    return load_config(None, TINY + list(overrides))


def lora_config(base: Path, *overrides):
    return config(*LORA, f"lora.base={base}", *overrides)


def fit(cfg, run_dir: Path, *, resume: bool = False, one_batch: bool = False) -> Trainer:
    """The trainer of cfg after training it into run_dir."""
    sources = build_data(cfg)
    if one_batch:
        sources = (OneBatch(sources[0]), OneBatch(sources[0]))
    trainer = Trainer(cfg, run_dir, sources=sources)
    trainer.fit(resume=resume)
    return trainer


def train_losses(run_dir: Path) -> list[float]:
    import json
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def flat_values(state) -> dict:
    """{path: numpy array} of an nnx.State."""
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def model_state_of(trainer: Trainer, kind=nnx.Variable) -> dict:
    """The trainer's model as it stands, its variables of `kind` as numpy arrays."""
    model = nnx.merge(trainer.graphdef, trainer.state["params"], trainer.state["model_state"])
    return flat_values(nnx.state(model, kind))


def logits(model) -> np.ndarray:
    """The model's eval-mode logits of TOKENS, op by op: one compiled program
    of a model with adapters fuses differently from one without, which moves
    float rounding."""
    model.eval()
    return np.asarray(model(TOKENS)[0])
