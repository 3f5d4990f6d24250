"""A training run's parameters alone, for inference (`jaxkit export`); a
LoRA run's adapters merged into its base's weights."""
from __future__ import annotations

import logging
from pathlib import Path

from flax import nnx

from jaxkit.checkpoint import export_params
from jaxkit.config import Config
from jaxkit.lora import merge_lora
from jaxkit.models.transformer import DTYPES
from jaxkit.run.load import load_run
from jaxkit.run.lora import load_lora_run
from jaxkit.sparsity import prune_linears

log = logging.getLogger(__name__)


def export_run(cfg: Config, run_dir: str | Path, out: str | Path, *, step: int | None = None,
               devices=None) -> int:
    """Writes the parameters of checkpoint `step` (default: the latest) of the
    run in run_dir to `out` (read back with jaxkit.checkpoint.load_params);
    returns the step."""
    if Path(out).exists():  # refused before the checkpoint is read
        raise FileExistsError(f"output directory {str(out)!r} already exists; name a new one")
    if cfg.lora.base is not None:
        return _export_lora(cfg, run_dir, out, step, devices)
    run = load_run(cfg, run_dir, step, devices=devices)
    params = run.params
    if cfg.model.sparsity.enabled:  # the pruned weights the forward multiplies by
        model = run.model()
        zeros = prune_linears(model)
        params = nnx.state(model, nnx.Param)
        sp = cfg.model.sparsity
        log.info("export: %d:%d sparse weights of %s, %.2f%% zeros", sp.n, sp.m,
                 ", ".join(sp.targets), 100 * zeros)
    export_params(params, out)
    return run.step


def _export_lora(cfg: Config, run_dir, out, step, devices) -> int:
    """The float model a LoRA run's forward stands for (jaxkit.lora.merge_lora)."""
    model, step = load_lora_run(cfg, run_dir, step, devices=devices)
    if cfg.model.quant.mode == "int":
        log.warning("export: the adapters are merged into the dequantised weights of %s; the "
                    "parameters written are float (%s): read them with model.quant.mode=none",
                    cfg.lora.base, cfg.model.param_dtype)
    export_params(nnx.state(merge_lora(model, DTYPES[cfg.model.param_dtype]), nnx.Param), out)
    return step
