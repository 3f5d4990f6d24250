"""Joining a multi-process run (several hosts, or several processes on one
host) through jax.distributed, before anything else touches a device.

Launchers: explicit --coordinator/--num-processes/--process-id flags (any
machine, CPU included), or a cluster launcher that started more than one
process: SLURM's srun, Open MPI's mpirun (jax then finds the coordinator
itself). Elsewhere (a Cloud TPU pod slice) `--distributed on` lets jax
detect the cluster. A single process needs no initialisation.
"""
from __future__ import annotations

import os

import jax


def launcher_process_count() -> int:
    """Processes started by a recognised cluster launcher (1 when none)."""
    for var in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def initialize(mode: str = "auto", coordinator: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Calls jax.distributed.initialize when the run spans several processes;
    returns whether it did."""
    explicit = (coordinator, num_processes, process_id)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    if mode == "off":
        if any(v is not None for v in explicit):
            raise ValueError("--distributed off contradicts --coordinator/--num-processes/"
                             "--process-id")
        return False
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together; got "
                         f"coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must lie in [0, {num_processes})")
    if mode == "auto" and coordinator is None and launcher_process_count() == 1:
        return False
    # CPU processes exchange collectives through gloo (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
