"""A training run's parameters alone, for inference (`jaxkit export`)."""
from __future__ import annotations

from pathlib import Path

from jaxkit.checkpoint import export_params
from jaxkit.config import Config
from jaxkit.run.load import load_run


def export_run(cfg: Config, run_dir: str | Path, out: str | Path, *, step: int | None = None,
               devices=None) -> int:
    """Writes the parameters of checkpoint `step` (default: the latest) of the
    run in run_dir to `out` (read back with jaxkit.checkpoint.load_params);
    returns the step."""
    if Path(out).exists():  # refused before the checkpoint is read
        raise FileExistsError(f"output directory {str(out)!r} already exists; name a new one")
    run = load_run(cfg, run_dir, step, devices=devices)
    export_params(run.params, out)
    return run.step
