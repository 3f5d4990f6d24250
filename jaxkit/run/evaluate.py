"""Evaluation: mean metrics of the eval step over the eval batches, the one
implementation behind the training loop's evals, `jaxkit eval` and the
losses `jaxkit quantize` reports."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxkit import sharding
from jaxkit.config import Config
from jaxkit.run.build import Batches
from jaxkit.run.load import load_run
from jaxkit.train.step import make_eval_step


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
