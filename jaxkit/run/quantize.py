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
from flax import nnx

from jaxkit.checkpoint import export_params
from jaxkit.config import Config, ConfigError, load_config
from jaxkit.models import unscan_layers
from jaxkit.quant.layer import Quantizer, QuantWeight
from jaxkit.quant.model import calibrate, quantize_model
from jaxkit.quant.ptq import prepare_ptq
from jaxkit.run.build import Batches, check_config
from jaxkit.run.evaluate import evaluate_model
from jaxkit.run.load import load_run
from jaxkit.train.step import model_on_batch


def _bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def quantize_run(cfg: Config, run_dir: str | Path, *, out: str | Path | None = None) -> dict:
    """PTQ of the latest checkpoint of the run in run_dir with cfg.model.quant
    (mode 'ptq' or 'int'), evaluated and calibrated on cfg's data. An existing
    out is refused before any work (the export would fail only at the end)."""
    if out is not None and Path(out).exists():
        raise FileExistsError(f"output directory {str(out)!r} already exists; name a new one")
    check_config(cfg)
    q = cfg.model.quant
    if q.mode not in ("ptq", "int"):
        raise ConfigError("jaxkit quantize needs model.quant.mode 'ptq' (simulated) or 'int' "
                          f"(low-bit storage), got {q.mode!r}")
    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        raise FileNotFoundError(f"no training run under {run_dir} (no config.yaml)")
    trained = load_config(saved)
    run = load_run(trained, run_dir)
    batches = Batches(dataclasses.replace(trained, data=cfg.data), run.mesh, run.rules)
    model = unscan_layers(run.model())
    eval_loss = lambda: float(evaluate_model(model, batches.eval(), run.mesh, run.rules)["ce"])
    float_bytes = _bytes(nnx.state(model, nnx.Param))
    result = {"step": run.step, "trained_quant_mode": trained.model.quant.mode,
              "eval_loss": {"trained": eval_loss()}}
    prepare_ptq(model, trained.model.quant, dataclasses.replace(q, mode="ptq"), trained.train.seed)
    if any(isinstance(m, Quantizer) for _, m in nnx.iter_modules(model)):
        calibration = (batches.train(i) for i in range(q.calibration_batches))
        result["calibration_batches"] = calibrate(model, calibration, model_on_batch)
    result["eval_loss"]["ptq"] = eval_loss()
    if q.mode == "int":
        result["converted_layers"] = quantize_model(model, q)
        result["eval_loss"]["int"] = eval_loss()
        # the converted weights only: float kernels before, codes + scales after
        result["converted_bytes"] = {
            "float": float_bytes - _bytes(nnx.state(model, nnx.Param)),
            "low_bit": _bytes(nnx.state(model, QuantWeight))}
    if out is not None:
        result["out"] = str(export_params(nnx.state(model), out))
    return result
