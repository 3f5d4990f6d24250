"""The training loop: build from config, step, log, evaluate, checkpoint.

Batches are pure functions of (seed, step), so the data position is the step
itself and a resumed run sees exactly the batches it would have seen.

The run is laid out on a device mesh (mesh config): the train state lives
sharded by the logical-axis rules, each process loads only its rows of the
global batch, and the jitted step runs SPMD over all devices of all processes.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxkit import sharding
from jaxkit.checkpoint import Checkpointer
from jaxkit.checkpoint.run_dir import check_fresh, check_resume, clear_run, exclusive
from jaxkit.config import Config, save_config
from jaxkit.lora import adapter_state
from jaxkit.run import evaluate as evaluation
from jaxkit.run import profile as profiling
from jaxkit.run.build import (Batches, build_mesh, build_optimizer, build_train_state,
                             check_config, check_devices)
from jaxkit.run.init_from import init_from_model, starts_from_run
from jaxkit.run.lora import build_lora_model
from jaxkit.train import flops
from jaxkit.train.metrics_log import MetricsLogger
from jaxkit.train.step import (NonFiniteLoss, all_finite, make_train_step, nonfinite_record,
                               track_nonfinite)


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


def _constrain_rows(batch):
    # Each micro-batch split over all batch shards: a micro-batch is a
    # contiguous block of rows, which would otherwise sit on a few devices.
    return jax.tree.map(lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), batch)


def _moe_summary(flat: dict) -> dict:
    """Progress-bar digest of the per-layer MoE metrics (all of them are in the
    JSONL): the most imbalanced layer's max/mean load, and the largest dropped
    fraction."""
    def worst(name):
        values = [v for k, v in flat.items() if k.startswith("moe/") and k.endswith("/" + name)]
        return max(values) if values else None
    out = {}
    if (load := worst("max_mean_load")) is not None:
        out["moe_load"] = f"{load:.2f}"
    if (dropped := worst("dropped_fraction")):
        out["moe_drop"] = f"{100 * dropped:.1f}%"
    return out


class Trainer:
    """`devices` (default: all) carry the mesh; `sources` (train, eval) replace
    the config's data sources (objects with .batch(step, process_index=,
    process_count=))."""

    def __init__(self, cfg: Config, run_dir: Path, *, devices=None, sources=None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.mesh, self.rules = build_mesh(cfg, devices)
        self.is_logger = jax.process_index() == 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.batches = Batches(cfg, self.mesh, self.rules, sources)
        self.optimizer, self.schedule = build_optimizer(cfg)
        with self.on_mesh():
            model = self.starting_model(devices)
            self.graphdef, self.eval_graphdef, self.state, state_sh = build_train_state(
                cfg, self.optimizer, self.mesh, self.rules, model)
        self.num_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        batch_sh = sharding.batch_sharding(self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.train_step = jax.jit(track_nonfinite(make_train_step(
            self.graphdef, self.optimizer, self.schedule, grad_accum=cfg.train.grad_accum,
            z_loss=cfg.train.z_loss, constrain_batch=_constrain_rows,
            skip_nonfinite=cfg.train.nonfinite == "skip", logits_dtype=cfg.train.logits_dtype)),
            in_shardings=(state_sh, replicated, batch_sh),
            out_shardings=(state_sh, replicated, replicated), donate_argnums=(0, 1))
        # the first non-finite step and their count, on device (track_nonfinite)
        self.nonfinite = jax.device_put(nonfinite_record(), replicated)
        self.params_finite = jax.jit(all_finite)
        self.eval_step = evaluation.eval_step(self.eval_graphdef, self.mesh)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint) \
            if cfg.checkpoint.enabled else None
        self.peak = flops.peak_tflops(jax.devices()[0].device_kind, cfg.train.peak_tflops)

    def starting_model(self, devices):
        """The model training starts from, None for a fresh build_model: a
        LoRA run's frozen base with fresh adapters, or (train.init_from, when
        the run has no checkpoint of its own) another run's parameters."""
        if self.cfg.lora.base is not None:
            return build_lora_model(self.cfg, devices)
        if starts_from_run(self.cfg, self.run_dir):
            return init_from_model(self.cfg, self.mesh, self.rules)
        return None

    def on_mesh(self):
        """Context in which the model's steps are traced: the mesh and rules active."""
        return sharding.activate(self.mesh, self.rules)

    # ------------------------------------------------------------- state I/O
    def checkpointed(self, state: dict) -> dict:
        """What a checkpoint holds of the train state: all of it, but of a
        LoRA run's model state only the adapters' (the frozen base is loaded
        from lora.base)."""
        if self.cfg.lora.base is None:
            return state
        return dict(state, model_state=adapter_state(state["model_state"]))

    def restore_latest(self) -> int:
        """Loads the newest verified checkpoint, if any (newer damaged ones are
        skipped with a warning); returns its step."""
        step = None if self.checkpointer is None else self.checkpointer.latest_verified_step()
        if step is None:
            return 0
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding),
                                self.checkpointed(self.state))
        restored = self.checkpointer.restore(step, abstract)
        if self.cfg.lora.base is not None:
            restored["model_state"] = nnx.merge_state(self.state["model_state"],
                                                      restored["model_state"])
        self.state = restored
        return step

    def save(self, step: int) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(step, self.checkpointed(self.state))

    def _stop_agreed(self, stop: StopRequest, step: int) -> bool:
        """Whether to stop after `step`. Saving is collective, so with several
        processes all must stop at the same step: they compare their signal
        flags at every log step (a host sync, hence not every step)."""
        if jax.process_count() == 1:
            return stop.requested
        if step % self.cfg.train.log_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.asarray(stop.requested))))

    def _stop_if_nonfinite(self, step: int, saving: bool = False, first: int | None = None) -> None:
        """Raises NonFiniteLoss, before anything of `step` is saved, when
        (train.nonfinite: stop) a step up to `step` had a non-finite loss or
        gradient norm, or when `saving` and the parameters are not finite
        (e.g. an overflowing update of finite gradients). first: the first
        non-finite step as of `step` (its metrics' nonfinite_first), or None
        to read the device record: a host sync, at log and checkpoint steps only."""
        if self.cfg.train.nonfinite != "stop":
            first = -1
        elif first is None:
            first = int(self.nonfinite["first"])
        if first >= 0:
            what = f"loss or gradient norm not finite at step {first}"
            hint = "lower optimizer.learning_rate, or set train.nonfinite=skip to skip such steps"
        elif saving and not bool(self.params_finite(self.state["params"])):
            what, hint = f"parameters not finite after step {step}", "lower optimizer.learning_rate"
        else:
            return
        latest = self.checkpointer.latest_step() if self.checkpointer is not None else None
        kept = "no checkpoint kept" if latest is None else f"last finite checkpoint: step {latest}"
        raise NonFiniteLoss(f"{what} (found at step {step}; nothing saved since, {kept}); {hint}")

    # ------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        return evaluation.evaluate(self.eval_step, self.state["params"], self.state["model_state"],
                                   self.batches.eval(), self.mesh, self.rules)

    # ------------------------------------------------------------- loop
    def compile_step(self, batch):
        """The train step compiled for this state and batch, timed; logs the
        compile time and the device memory XLA plans for one step."""
        t = time.perf_counter()
        with self.on_mesh():
            compiled = self.train_step.lower(self.state, self.nonfinite, batch).compile()
        info = {"compile_seconds": time.perf_counter() - t}
        memory = compiled.memory_analysis()
        if memory is not None:
            gib = lambda n: n / 2 ** 30
            info.update(arguments_gib=gib(memory.argument_size_in_bytes),
                        temporaries_gib=gib(memory.temp_size_in_bytes))
        return compiled, info

    def run_step(self, step_fn, step: int) -> dict:
        """Runs train step `step` (the batch index) with step_fn (compile_step's)
        on this state; returns its metrics, still on device."""
        self.state, self.nonfinite, metrics = step_fn(self.state, self.nonfinite,
                                                      self.batches.train(step))
        return metrics

    def profile_steps(self, step_fn, step: int, steps: int = 3) -> dict:
        """Traces `steps` steps from `step` into run_dir/profile and writes the
        breakdown to run_dir/profile.json."""
        trace_dir = self.run_dir / "profile"
        jax.block_until_ready(self.state)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True), self.on_mesh():
            for i in range(steps):
                metrics = self.run_step(step_fn, step + i)
            jax.block_until_ready(metrics)
        result = profiling.breakdown(profiling.read_trace(trace_dir), steps,
                                     profiling.hlo_op_names(step_fn.as_text()))
        (self.run_dir / "profile.json").write_text(json.dumps(result, indent=1))
        return result

    def fit(self, resume: bool = False, profile: bool = False) -> dict:
        """Trains to train.steps. profile: after 10 warm steps, trace 3 steps
        and write the time breakdown (profile.json) before going on."""
        cfg = self.cfg.train
        start = self.restore_latest() if resume else 0
        if self.is_logger:  # after the restore: a failed resume leaves the run's config as it was
            save_config(self.cfg, self.run_dir / "config.yaml")
        logger = MetricsLogger(self.run_dir, enabled=self.is_logger)
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
        last = {"step": start}
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and self.is_logger),
                   dynamic_ncols=True, desc="train")
        step_fn, compiled = self.compile_step(self.batches.train(start))
        logger.log(start, "compile", compiled)
        bar.write(f"train step compiled in {compiled['compile_seconds']:.1f} s")
        profile_at = start + 10 if profile else None
        interval = dict(t0=time.perf_counter(), step=start)  # the current log interval's start
        # A log step's metrics are read (a host sync) once the next step is
        # dispatched, so the GPU runs that step while the host logs; at once
        # where this step's state is needed next (eval, checkpoint, stop, end).
        pending = None

        def log_train(at: int, metrics: dict) -> None:
            metrics = jax.device_get(metrics)
            first = int(metrics.pop("nonfinite_first"))
            dt = time.perf_counter() - interval["t0"]
            tok_s = tokens_per_step * (at - interval["step"]) / max(dt, 1e-9)
            metrics["tokens_per_second"] = tok_s
            postfix = dict(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tok_s:,.0f}")
            if self.peak is not None:  # MFU only against a known peak
                metrics["mfu"] = flops.mfu(tok_s, self.cfg.model, self.cfg.data.seq_len,
                                           self.mesh.size, self.peak)
                postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            if metrics["nonfinite_steps"]:  # train.nonfinite: skip
                postfix["skipped"] = int(metrics["nonfinite_steps"])
            flat = logger.log(at, "train", metrics)
            self._stop_if_nonfinite(at, first=first)
            bar.set_postfix(**postfix, **_moe_summary(flat), refresh=False)
            bar.update(at - bar.n)
            last.update(step=at, train=flat)
            interval.update(t0=time.perf_counter(), step=at)

        def log_pending() -> None:
            nonlocal pending
            if pending is not None:
                log_train(*pending)
                pending = None

        step, stopping = start, False
        with StopRequest() as stop:
            try:
                while step < cfg.steps and not stopping:
                    if step == profile_at and step + 3 <= cfg.steps:
                        log_pending()
                        last["profile"] = self.profile_steps(step_fn, step)
                        bar.write(profiling.format_table(last["profile"]))
                        step += 3
                        interval.update(t0=time.perf_counter(), step=step)
                        continue
                    with self.on_mesh():
                        metrics = self.run_step(step_fn, step)
                    step += 1
                    log_pending()
                    evaluating = bool(cfg.eval_every) and step % cfg.eval_every == 0
                    saving = self.checkpointer is not None and self.checkpointer.due(step)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        if evaluating or saving or stop.requested or step == cfg.steps:
                            log_train(step, metrics)
                        else:
                            pending = (step, metrics)
                    if evaluating:
                        last["eval"] = logger.log(step, "eval", self.evaluate())
                        bar.write(f"step {step}: eval loss {last['eval']['ce']:.4f} "
                                  f"ppl {last['eval']['perplexity']:.2f}")
                        interval.update(t0=time.perf_counter(), step=step)
                    if saving:
                        self._stop_if_nonfinite(step, saving=True)
                        self.save(step)
                    stopping = self._stop_agreed(stop, step)
                log_pending()  # a stop agreed after a log step was deferred
                if step > start or stopping:
                    self._stop_if_nonfinite(step, saving=self.checkpointer is not None)
                    self.save(step)
                last["step"] = step
                last["stopped_early"] = stopping
            finally:
                bar.close()
                logger.close()
                if self.checkpointer is not None:
                    self.checkpointer.close()
        return last


def train(cfg: Config, *, config_path: str | None = None, resume: bool = False,
          restart: bool = False, run_dir: str | Path | None = None, profile: bool = False) -> dict:
    """Trains the run in run_dir (default: train.out_dir/<config name>).
    resume: continue from its newest verified checkpoint (a config that
    changes the checkpoint's structure is refused first); restart: delete an
    earlier run's checkpoints and metrics first; neither: refuse a run
    directory that holds an earlier run. All before anything is built. A run
    without a checkpoint of its own starts from train.init_from's
    parameters when that is set (jaxkit.run.init_from)."""
    if resume and restart:
        raise ValueError("resume and restart exclude each other")
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg, config_path)
    check_config(cfg)  # a bad value is refused before the run directory is made
    check_devices(cfg)
    # process 0 holds the run directory (on a cluster every process shares it)
    with exclusive(run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        if resume:
            check_resume(cfg, run_dir)
        elif restart:
            if jax.process_index() == 0:
                clear_run(run_dir)
            if jax.process_count() > 1:  # no process starts before the old run is gone
                multihost_utils.sync_global_devices("jaxkit restart")
        else:
            check_fresh(run_dir)
        return Trainer(cfg, run_dir).fit(resume=resume, profile=profile)
