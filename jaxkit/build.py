"""The one place that maps a Config to objects: model, optimizer, data."""
from __future__ import annotations

from pathlib import Path

from flax import nnx

from jaxkit.config import Config, ConfigError
from jaxkit.models import Transformer
from jaxkit.train.optim import make_optimizer, make_schedule


def build_model(cfg: Config) -> Transformer:
    return Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))


def build_optimizer(cfg: Config):
    return make_optimizer(cfg.optimizer, cfg.train.steps), make_schedule(cfg.optimizer, cfg.train.steps)


def build_data(cfg: Config):
    """Returns (train_source, eval_source) with .batch(step, process_index, process_count)."""
    from jaxkit import data
    d = cfg.data
    if d.kind == "mqar":
        if cfg.model.vocab_size < d.mqar_vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) must be >= "
                              f"data.mqar_vocab_size ({d.mqar_vocab_size})")
        make = lambda seed: data.MQARTask(vocab_size=d.mqar_vocab_size, seq_len=d.seq_len,
                                          num_kv_pairs=d.mqar_num_kv_pairs, seed=seed,
                                          global_batch_size=d.batch_size)
        return make(d.seed), make(d.seed + 1_000_003)
    root = Path(d.path)
    if not (root / "train.json").exists():
        raise ConfigError(f"data.path {d.path!r} holds no token files (train.bin/train.json); "
                          f"create them with: jaxkit data prepare --out {d.path}")
    train_file, val_file = data.TokenFile(root / "train"), data.TokenFile(root / "val")
    if train_file.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's "
                          f"vocabulary ({train_file.vocab_size})")
    return (data.TokenBatcher(train_file, d.seq_len, d.batch_size, d.seed),
            data.TokenBatcher(val_file, d.seq_len, d.batch_size, d.seed + 1))
