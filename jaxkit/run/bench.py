"""Sharded-training throughput: tokens/s of the real training loop on 1, 2,
... devices at equal per-device batch, with the mesh given by overrides
(default: FSDP over all devices).

    python -m jaxkit.run.bench configs/gpt_125m.yaml --devices 1 2 --json out.json

Tokens come from a synthetic source (uniform random ids, a pure function of
(seed, step)), so no data files are needed. Each run trains `--steps`
steps, logging every `--log-every`; the first interval (compilation) is
dropped and the median of the others is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np

from jaxkit.config import load_config
from jaxkit.data.batches import process_slice
from jaxkit.run.trainer import Trainer


class RandomTokens:
    """Uniform random token windows; rows of the global batch per process."""

    def __init__(self, vocab_size: int, seq_len: int, global_batch_size: int, seed: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.global_batch_size, self.seed = global_batch_size, seed

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        rows = process_slice(self.global_batch_size, process_index, process_count)
        rng = np.random.default_rng((self.seed, step))
        window = rng.integers(0, self.vocab_size, (self.global_batch_size, self.seq_len + 1),
                              dtype=np.int32)[rows]
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}


def measure(config: str, overrides: list[str], num_devices: int, steps: int, log_every: int) -> dict:
    base = load_config(config, overrides)
    per_device = base.data.batch_size
    cfg = load_config(config, overrides + [
        f"data.batch_size={per_device * num_devices}", f"train.steps={steps}",
        f"train.log_every={log_every}", "train.eval_every=0", "checkpoint.enabled=false",
        "train.progress=false"])
    source = RandomTokens(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.batch_size, 0)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir, devices=jax.devices()[:num_devices],
                          sources=(source, source))
        trainer.fit()
        total = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    rates = [r["tokens_per_second"] for r in records if r["split"] == "train"][1:]
    return dict(devices=num_devices, mesh=dict(trainer.mesh.shape), global_batch=cfg.data.batch_size,
                seq_len=cfg.data.seq_len, params=int(trainer.num_params),
                tokens_per_second=statistics.median(rates), intervals=rates,
                mfu=[r["mfu"] for r in records][-1], loss=records[-1]["loss"], wall_s=total)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("--devices", type=int, nargs="+", default=[1, jax.device_count()])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override; default adds mesh.data=1 mesh.fsdp=-1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    overrides = ["mesh.data=1", "mesh.fsdp=-1"] + args.overrides
    results = []
    for n in args.devices:
        try:
            results.append(measure(args.config, overrides, n, args.steps, args.log_every))
        except Exception as e:  # report the failure, go on with the other sizes
            traceback.print_exc()
            results.append(dict(devices=n, error=f"{type(e).__name__}: {e}"[:2000]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            device=jax.devices()[0].device_kind, jax=jax.__version__, overrides=overrides,
            results=results), indent=1))
    base = next((r for r in results if r.get("devices") == 1 and "error" not in r), None)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.config} {overrides}")
    print(f"{'devices':>7} {'mesh':>28} {'batch':>6} {'tokens/s':>12} {'speedup':>8} {'MFU':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['devices']:>7} failed: {r['error'][:200]}")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "single"
        speedup = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        print(f"{r['devices']:>7} {mesh:>28} {r['global_batch']:>6} {r['tokens_per_second']:>12,.0f} "
              f"{speedup:>7.2f}x {100 * r['mfu']:>5.1f}%")


if __name__ == "__main__":
    main()
