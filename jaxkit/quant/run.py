"""Post-training quantisation of a training run (`jaxkit quantize`).

Loads the run's latest checkpoint into the model it was trained as (its saved
config.yaml: float, or QAT with the formats to keep), unrolls scanned layers,
calibrates on training batches with the requested QuantConfig in mode 'ptq',
and in mode 'int' converts the weights to low-bit storage. Reports the eval
loss of the float (or QAT) model, the simulation and the converted model on
the same batches, and the bytes the quantised weights take. The converted
model state can be written for inference.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxkit.build import check_config
from jaxkit.config import Config, ConfigError, QuantConfig, load_config
from jaxkit.models import unscan_layers
from jaxkit.quant.experts import ExpertQuantizer
from jaxkit.quant.layer import Quantizer, QuantWeight
from jaxkit.quant.model import attach_quantizers, calibrate, quantize_model
from jaxkit.train.step import make_eval_step, model_on_batch
from jaxkit.train.trainer import Trainer


def _eval_ce(model, trainer: Trainer) -> float:
    """Mean eval cross-entropy over the batches Trainer.evaluate uses."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = jax.jit(make_eval_step(graphdef))
    ces = [float(step(params, rest, jax.tree.map(jnp.asarray, trainer.eval_data.batch(i)))["ce"])
           for i in range(trainer.cfg.train.eval_batches)]
    return float(np.mean(ces))


def _prepare(model, trained: QuantConfig, ptq: QuantConfig, seed: int) -> None:
    """Gives the model quantizers in mode 'ptq': fresh ones for a float run;
    for a QAT run its own (keeping their rotations), which must use the
    requested formats."""
    if trained.mode == "none":
        attach_quantizers(model, ptq, rngs=nnx.Rngs(seed))
        return
    if dataclasses.replace(trained, mode="ptq") != ptq:
        raise ConfigError(f"the run was trained with model.quant {trained}; quantize it with the "
                          f"same settings (only the mode may change), got {ptq}")
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (Quantizer, ExpertQuantizer)):
            m.cfg = ptq


def _bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def quantize_run(cfg: Config, run_dir: str | Path, *, out: str | Path | None = None) -> dict:
    """PTQ of the run in run_dir with cfg.model.quant (mode 'ptq' or 'int')."""
    check_config(cfg)
    q = cfg.model.quant
    if q.mode not in ("ptq", "int"):
        raise ConfigError("jaxkit quantize needs model.quant.mode 'ptq' (simulated) or 'int' "
                          f"(low-bit storage), got {q.mode!r}")
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise FileNotFoundError(f"no training run under {run_dir} (no config.yaml)")
    trained = load_config(saved)
    trainer = Trainer(dataclasses.replace(trained, data=cfg.data), run_dir)
    try:
        step = trainer.restore_latest()
    finally:
        if trainer.checkpointer is not None:
            trainer.checkpointer.close()
    if step == 0:
        raise FileNotFoundError(f"no checkpoint under {run_dir / 'checkpoints'}")
    model = unscan_layers(nnx.merge(trainer.eval_graphdef, trainer.state["params"],
                                    trainer.state["model_state"]))
    float_bytes = _bytes(nnx.state(model, nnx.Param))
    result = {"step": step, "trained_quant_mode": trained.model.quant.mode,
              "eval_loss": {"trained": _eval_ce(model, trainer)}}
    ptq = dataclasses.replace(q, mode="ptq")
    _prepare(model, trained.model.quant, ptq, trained.train.seed)
    if any(isinstance(m, Quantizer) for _, m in nnx.iter_modules(model)):
        batches = (jax.tree.map(jnp.asarray, trainer.train_data.batch(i))
                   for i in range(q.calibration_batches))
        result["calibration_batches"] = calibrate(model, batches, model_on_batch)
    result["eval_loss"]["ptq"] = _eval_ce(model, trainer)
    if q.mode == "int":
        result["converted_layers"] = quantize_model(model, q)
        result["eval_loss"]["int"] = _eval_ce(model, trainer)
        # the converted weights only: float kernels before, codes + scales after
        result["converted_bytes"] = {
            "float": float_bytes - _bytes(nnx.state(model, nnx.Param)),
            "low_bit": _bytes(nnx.state(model, QuantWeight))}
    if out is not None:
        out = Path(out).absolute()
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(out, nnx.to_pure_dict(nnx.state(model)))
            ckpt.wait_until_finished()
        result["out"] = str(out)
    return result
