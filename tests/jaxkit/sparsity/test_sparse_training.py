"""A tiny 2:4 SR-STE run trains (fits a batch), its forward always uses 2:4
weights, and `jaxkit export` writes them: exactly 2 nonzeros in every 4
consecutive input features, the pruned checkpoint weights, and the logits of
the trained sparse model under a dense (sparsity off) model."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.checkpoint import load_params
from jaxkit.config import load_config
from jaxkit.models import Transformer
from jaxkit.run.build import build_data
from jaxkit.run.export import export_run
from jaxkit.run.load import load_run
from jaxkit.run.trainer import Trainer
from jaxkit.sparsity import nm_prune, sparse_linears

STEPS = 30
RUN = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
       "model.mlp_hidden=64", "model.max_seq_len=32", "model.compute_dtype=float32",
       "model.tie_embeddings=false", "data.kind=mqar", "data.seq_len=32", "data.batch_size=8",
       "data.mqar_vocab_size=64", "data.mqar_num_kv_pairs=4", "train.eval_every=0",
       "train.progress=false", "train.log_every=1", f"train.steps={STEPS}",
       "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=2",
       "checkpoint.async_save=false"]
SPARSE = ["model.sparsity.enabled=true", "model.sparsity.targets=[q,k,v,o,mlp,head]"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)


class FirstBatch:
    """Serves its source's first batch at every step: a task a few steps fit."""

    def __init__(self, source):
        self.source = source

    def batch(self, step, **kw):
        return self.source.batch(0, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, run directory, export directory) of a 2:4 run and its export."""
    tmp = tmp_path_factory.mktemp("sparse_run")
    cfg = load_config(None, RUN + SPARSE)
    source = build_data(cfg)[0]
    Trainer(cfg, tmp / "run", sources=(FirstBatch(source), FirstBatch(source))).fit()
    export_run(cfg, tmp / "run", tmp / "export")
    return cfg, tmp / "run", tmp / "export"


def test_the_sparse_run_trains(run):
    _, run_dir, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def exported_model(cfg, export_dir, sparse: bool) -> Transformer:
    model_cfg = load_config(None, RUN + (SPARSE if sparse else [])).model
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    return load_params(export_dir, model)


def test_exported_weights_are_2_4_sparse(run):
    cfg, run_dir, export_dir = run
    trained = load_run(cfg, run_dir).model()
    linears = sparse_linears(trained)
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    exported = {id(a): b for a, b in zip(sparse_linears(trained),
                                          sparse_linears(exported_model(cfg, export_dir, True)))}
    for linear in linears:
        kernel = np.asarray(linear.kernel[...])
        written = np.asarray(exported[id(linear)].kernel[...])
        nonzero = (written != 0).reshape(kernel.shape[0] // 4, 4, kernel.shape[1]).sum(axis=1)
        assert (nonzero == 2).all()
        np.testing.assert_array_equal(written, nm_prune(jnp.asarray(kernel), 2, 4))


def test_export_stands_for_the_sparse_forward(run):
    cfg, run_dir, export_dir = run
    trained = load_run(cfg, run_dir).model()
    dense = exported_model(cfg, export_dir, sparse=False)
    assert not sparse_linears(dense)
    np.testing.assert_allclose(dense(TOKENS)[0], trained(TOKENS)[0], rtol=1e-5, atol=1e-5)
