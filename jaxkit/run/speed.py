"""Training speed of a config on this machine: compile time, steady-state step
time, tokens/s, MFU, peak device memory and where a step's time goes.

    python -m jaxkit.run.speed configs/dense_1b.yaml [--set KEY=VALUE ...] [--json out.json]

The step is compiled ahead of time (as `jaxkit train` does), run `--warmup`
steps, then timed as the median of `--rounds` intervals of train.log_every
steps, each ending where the trainer reads a log step's metrics: once the
next step is dispatched, so the device is busy through the read (tokens/s
and MFU are what the training log prints), then 3 steps are traced for the
breakdown (jaxkit.run.profile). Nothing is written to the run directory but
a trace.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax

from jaxkit.config import load_config
from jaxkit.run.trainer import Trainer
from jaxkit.train import flops


def measure(cfg, *, warmup: int = 10, rounds: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        step_fn, compiled = trainer.compile_step(trainer.batches.train(0))
        step, every, marks, pending = 0, cfg.train.log_every, [], None
        with trainer.on_mesh():
            while len(marks) <= rounds:
                metrics = trainer.run_step(step_fn, step)
                step += 1
                if pending is not None:  # the previous step was a log step
                    jax.block_until_ready(pending)
                    marks.append(time.perf_counter())
                    pending = None
                if step > warmup and step % every == 0:
                    pending = metrics
            jax.block_until_ready(metrics)
        step_s = statistics.median((b - a) / every for a, b in zip(marks, marks[1:]))
        profile = trainer.profile_steps(step_fn, step)
        peak, num_devices = trainer.peak, trainer.mesh.size
    tokens_per_s = cfg.data.batch_size * cfg.data.seq_len / step_s
    device = jax.devices()[0]
    memory = device.memory_stats() or {}
    return dict(device=device.device_kind, jax_version=jax.__version__, **compiled,
                step_ms=1e3 * step_s, tokens_per_second=tokens_per_s,
                mfu=None if peak is None else flops.mfu(tokens_per_s, cfg.model, cfg.data.seq_len,
                                                        num_devices, peak),
                peak_memory_gib=memory.get("peak_bytes_in_use", 0) / 2 ** 30,
                loss=float(metrics["loss"]), breakdown=profile)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides + ["train.eval_every=0",
                                                      "checkpoint.enabled=false",
                                                      "train.progress=false"])
    result = measure(cfg, warmup=args.warmup, rounds=args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "breakdown"}))
    from jaxkit.run.profile import format_table
    print(format_table(result["breakdown"]))


if __name__ == "__main__":
    main()
