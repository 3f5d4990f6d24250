"""A thin layer over orbax's CheckpointManager: async saves every N steps,
keep-last-N plus keep-every-M, restore of the latest complete checkpoint.

Orbax writes each checkpoint to a temporary directory and renames it only
once complete, so a crash mid-save leaves the previous checkpoint intact;
the leftover temporary directory is removed when the next run opens the
manager. Arrays are stored with their global shapes, so a checkpoint
restores onto any mesh: the target shardings decide the layout.
"""
from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from jaxkit.config import CheckpointConfig


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, state) -> None:
        """Starts saving `state` at `step` (returns before the write ends when async);
        a step already saved is left as it is."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state):
        """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves
        with .sharding), so a checkpoint saved on one mesh loads onto another."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_subset(self, step: int, abstract: dict) -> dict:
        """Restores only the top-level entries `abstract` names (e.g. params
        and model_state: the optimizer state is never read), onto its
        shardings."""
        return self.manager.restore(step, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
