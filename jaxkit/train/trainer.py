"""The training loop: build from config, step, log, evaluate, checkpoint.

Batches are pure functions of (seed, step), so the data position is the step
itself and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxkit.build import build_data, build_model, build_optimizer
from jaxkit.checkpoint import Checkpointer
from jaxkit.config import Config, save_config
from jaxkit.train import flops
from jaxkit.train.metrics_log import MetricsLogger
from jaxkit.train.step import make_eval_step, make_train_step


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so a stop saves first."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_dir_for(cfg: Config, config_path: str | None) -> Path:
    name = cfg.train.run_name or (Path(config_path).stem if config_path else "run")
    return Path(cfg.train.out_dir) / name


def _split_model(model):
    """Graph definitions for training and evaluation mode, and the model state."""
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, eval_graphdef, params, model_state


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.is_logger = jax.process_index() == 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_logger:
            save_config(cfg, self.run_dir / "config.yaml")
        self.train_data, self.eval_data = build_data(cfg)
        model = build_model(cfg)
        self.num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.graphdef, self.eval_graphdef, params, model_state = _split_model(model)
        self.optimizer, self.schedule = build_optimizer(cfg)
        self.state = dict(params=params, opt_state=self.optimizer.init(params),
                          model_state=model_state, step=jnp.zeros((), jnp.int32))
        self.train_step = jax.jit(make_train_step(
            self.graphdef, self.optimizer, self.schedule, grad_accum=cfg.train.grad_accum,
            z_loss=cfg.train.z_loss), donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(self.eval_graphdef))
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint) \
            if cfg.checkpoint.enabled else None
        self.peak = flops.peak_tflops(jax.devices()[0].device_kind, cfg.train.peak_tflops)

    # ------------------------------------------------------------- state I/O
    def _batch(self, source, step):
        b = source.batch(step, process_index=jax.process_index(),
                         process_count=jax.process_count())
        return {k: jnp.asarray(v) for k, v in b.items()}

    def restore_latest(self) -> int:
        """Loads the newest complete checkpoint, if any; returns its step."""
        if self.checkpointer is None or self.checkpointer.latest_step() is None:
            return 0
        step = self.checkpointer.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), self.state)
        self.state = self.checkpointer.restore(step, abstract)
        return step

    def save(self, step: int) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(step, self.state)

    # ------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        results = []
        for i in range(self.cfg.train.eval_batches):
            batch = self._batch(self.eval_data, i)
            results.append(self.eval_step(self.state["params"], self.state["model_state"], batch))
        mean = jax.tree.map(lambda *xs: np.mean([np.asarray(x) for x in xs], axis=0), *results)
        mean["perplexity"] = float(np.exp(mean["ce"]))
        return mean

    # ------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg.train
        start = self.restore_latest() if resume else 0
        logger = MetricsLogger(self.run_dir, enabled=self.is_logger)
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
        last = {"step": start}
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and self.is_logger),
                   dynamic_ncols=True, desc="train")
        t0, t0_step = time.perf_counter(), start
        step = start
        with StopRequest() as stop:
            try:
                while step < cfg.steps and not stop.requested:
                    self.state, metrics = self.train_step(self.state, self._batch(self.train_data, step))
                    step += 1
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        metrics = jax.device_get(metrics)
                        dt = time.perf_counter() - t0
                        tok_s = tokens_per_step * (step - t0_step) / max(dt, 1e-9)
                        metrics["tokens_per_second"] = tok_s
                        metrics["mfu"] = flops.mfu(tok_s, self.cfg.model, self.cfg.data.seq_len,
                                                   jax.device_count(), self.peak)
                        flat = logger.log(step, "train", metrics)
                        bar.set_postfix(loss=f"{flat['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                                        mfu=f"{100 * metrics['mfu']:.1f}%", refresh=False)
                        bar.update(step - bar.n)
                        last.update(step=step, train=flat)
                        t0, t0_step = time.perf_counter(), step
                    if cfg.eval_every and step % cfg.eval_every == 0:
                        last["eval"] = logger.log(step, "eval", self.evaluate())
                        bar.write(f"step {step}: eval loss {last['eval']['ce']:.4f} "
                                  f"ppl {last['eval']['perplexity']:.2f}")
                        t0, t0_step = time.perf_counter(), step
                    if self.checkpointer is not None and self.checkpointer.due(step):
                        self.save(step)
                if step > start or stop.requested:
                    self.save(step)
                last["step"] = step
                last["stopped_early"] = stop.requested
            finally:
                bar.close()
                logger.close()
                if self.checkpointer is not None:
                    self.checkpointer.close()
        return last


def train(cfg: Config, *, config_path: str | None = None, resume: bool = False,
          run_dir: str | Path | None = None) -> dict:
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg, config_path)
    return Trainer(cfg, run_dir).fit(resume=resume)
