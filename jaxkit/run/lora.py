"""The model of a LoRA run: its frozen base loaded from lora.base (at the
start and at every resume: checkpoints hold the adapters only), with
adapters around the projections lora.targets names; and a finished run's
adapters restored onto it, for export."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import yaml
from flax import nnx

from jaxkit.checkpoint import Checkpointer
from jaxkit.checkpoint.run_dir import CONFIG, structural_differences
from jaxkit.config import CheckpointConfig, Config, ConfigError, LoRAConfig
from jaxkit.lora import adapter_state, apply_lora, freeze
from jaxkit.models import Transformer, unscan_layers
from jaxkit.run.load import load_model, load_run


def _base_config(cfg: Config) -> Config:
    """cfg without LoRA: the config the base was made with."""
    return dataclasses.replace(cfg, lora=LoRAConfig())


def _from_run(cfg: Config, base: Path, devices) -> Transformer:
    """The latest intact checkpoint of the training run in `base`, unrolled."""
    if cfg.model.quant.mode == "int":
        raise ConfigError(f"lora.base {str(base)!r} is a training run, whose weights are float: "
                          "model.quant.mode 'int' (QLoRA) needs a `jaxkit quantize --out` "
                          "directory, or set model.quant.mode=none")
    saved_path = base / CONFIG
    saved = (yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None) or {}
    scanned = bool(saved.get("model", {}).get("scan_layers", False))
    model_cfg = dataclasses.replace(cfg.model, scan_layers=scanned)
    described = dataclasses.replace(cfg, model=model_cfg)
    differences = [d for d in structural_differences(saved, described) if d.startswith("model.")]
    if saved and differences:
        raise ConfigError(f"lora.base {str(base)!r} was trained with a different "
                          + ", ".join(differences) + ": the model section must describe the base")
    run = load_run(dataclasses.replace(_base_config(cfg), model=model_cfg), base, devices=devices)
    return unscan_layers(run.model())


def load_base(cfg: Config, devices=None) -> Transformer:
    """The model lora.base holds, unrolled: a run's latest intact checkpoint
    (on cfg's mesh over `devices`), a `jaxkit export` directory, or
    (model.quant.mode 'int') a `jaxkit quantize --out` directory (both on the
    first device). ConfigError when it is missing or its arrays do not fit
    cfg's model section."""
    base = Path(cfg.lora.base)
    if not base.is_dir():
        raise ConfigError(f"lora.base {str(base)!r} "
                          f"{'is not a directory' if base.exists() else 'does not exist'}")
    if (base / "checkpoints").is_dir():
        return _from_run(cfg, base, devices)
    try:
        return load_model(_base_config(cfg), params=base)
    except ConfigError as e:
        raise ConfigError(f"lora.base: {e}") from None


def build_lora_model(cfg: Config, devices=None) -> Transformer:
    """The base of cfg.lora frozen, with fresh adapters (seeded by train.seed)."""
    model = load_base(cfg, devices)
    freeze(model)
    apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed))
    return model


def load_lora_run(cfg: Config, run_dir: str | Path, step: int | None = None, *,
                  devices=None) -> tuple[Transformer, int]:
    """(model, step): the LoRA model of cfg with the adapters of checkpoint
    `step` (default: the latest intact one) of the LoRA run in run_dir.
    Reads only; FileNotFoundError (or DamagedCheckpointError) as load_run."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint under {directory}")
    model = build_lora_model(cfg, devices)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    saved = dict(params=params, model_state=adapter_state(rest))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            saved)
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False), read_only=True)
    try:
        step = checkpointer.intact_step(step)
        restored = checkpointer.restore_subset(step, abstract)
    finally:
        checkpointer.close()
    nnx.update(model, restored["params"], restored["model_state"])
    return model, step
