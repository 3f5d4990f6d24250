"""Evaluation: mean metrics of the eval step over the eval batches, the one
implementation behind the training loop's evals, `jaxkit eval` (of a run,
or of exported or converted parameters) and the losses `jaxkit quantize`
reports."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxkit import sharding
from jaxkit.config import Config, MeshConfig
from jaxkit.run.build import Batches, build_mesh
from jaxkit.run.load import load_model, load_run
from jaxkit.train.step import make_eval_step

# metrics that are means over a batch's counted tokens: their mean over
# batches weighs each batch by its token count (packed rows count no padding)
PER_TOKEN = ("ce", "z_loss", "accuracy")


def eval_step(graphdef, mesh):
    """The jitted eval step of a model split as (graphdef, params, rest):
    (params, model_state, batch) -> metrics, replicated so that every
    process can read them."""
    return jax.jit(make_eval_step(graphdef), out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate(step, params, model_state, batches, mesh, rules) -> dict:
    """Mean of step's metrics over `batches`, plus the perplexity; traced
    with the mesh and rules active."""
    results = []
    for batch in batches:
        with sharding.activate(mesh, rules):
            results.append(step(params, model_state, batch))
    mean = jax.tree.map(lambda *xs: np.mean([np.asarray(x) for x in xs], axis=0), *results)
    tokens = np.array([float(r["tokens"]) for r in results])
    for key in PER_TOKEN:
        mean[key] = np.float32(sum(float(r[key]) * t for r, t in zip(results, tokens))
                               / max(tokens.sum(), 1.0))
    mean["perplexity"] = float(np.exp(mean["ce"]))
    return mean


def evaluate_model(model: nnx.Module, batches, mesh, rules) -> dict:
    """evaluate for a model as it is now (its own graph, e.g. after
    quantisation)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return evaluate(eval_step(graphdef, mesh), params, rest, batches, mesh, rules)


def evaluate_run(cfg: Config, run_dir: str | Path, *, step: int | None = None) -> tuple[int, dict]:
    """(step, metrics) of checkpoint `step` (default: the latest) of the run
    in run_dir on cfg's eval data."""
    run = load_run(cfg, run_dir, step)
    batches = Batches(cfg, run.mesh, run.rules)
    metrics = evaluate(eval_step(run.graphdef, run.mesh), run.params, run.model_state,
                       batches.eval(), run.mesh, run.rules)
    return run.step, metrics


def evaluate_params(cfg: Config, params: str | Path) -> dict:
    """Metrics of the model whose values `params` holds (a `jaxkit export`
    directory, a converted model's params, or with its model.quant a
    `jaxkit quantize --out` directory; see load_model) on cfg's eval data,
    on one device. The data is opened, and checked, before the model."""
    cfg = dataclasses.replace(cfg, mesh=MeshConfig())  # one device
    mesh, rules = build_mesh(cfg, jax.devices()[:1])
    batches = Batches(cfg, mesh, rules)
    model = load_model(cfg, params=params)
    model.eval()
    return evaluate_model(model, batches.eval(), mesh, rules)
