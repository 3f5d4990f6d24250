"""A thin layer over orbax's CheckpointManager: async saves every N steps,
keep-last-N plus keep-every-M, restore of the newest verified checkpoint.

Orbax writes each checkpoint to a temporary directory and renames it only
once complete, so a crash mid-save leaves the previous checkpoint intact;
the leftover temporary directory is removed when the next run opens the
manager for writing. Once a save has finished (the next save or close waits
for it), checksums.json is written into its step directory by a background
thread (hashing a 1B-parameter state reads ~12 GB: seconds the training loop
does not wait for; close waits for it), and a restore
verifies it first (verify.py): a step without it, or with a file that
differs, is skipped with a warning in favour of the next older one. Arrays
are stored with their global shapes, so a checkpoint restores onto any mesh:
the target shardings decide the layout.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_manager import DEFAULT_ITEM_NAME

from jaxkit.checkpoint.verify import DamagedCheckpointError, verify_checksums, write_checksums
from jaxkit.config import CheckpointConfig

log = logging.getLogger(__name__)


class Checkpointer:
    """read_only: for commands that only read a run (no directory created, no
    temporary directory of a save in progress removed, nothing written)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.cfg = cfg
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save, create=not read_only,
            cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saved: set[int] = set()  # steps this instance saved
        self._unsummed: list[int] = []  # saved steps still without checksums
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksums")
        self._hashing: list[Future] = []

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, state) -> None:
        """Starts saving `state` at `step` (returns before the write ends when
        async). A step this instance saved already is left as it is; one left
        by an earlier run (possibly damaged) is replaced."""
        if step in self._saved:
            return
        self._finish_pending()
        # Once this save commits, retention deletes the oldest kept step: its
        # checksums must be on disk before then (hashing a directory being
        # deleted fails). With keep_last 1 that is the step just handed to the
        # hasher; otherwise an older one.
        self._wait_hashing(spare_newest=self.cfg.keep_last != 1)
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._saved.add(step)
        self._unsummed.append(step)

    def _finish_pending(self) -> None:
        """Waits for the save in flight, then starts writing the checksums of
        the steps saved since the last call in the background (on the process
        that writes the run's files)."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0 and self._unsummed:
            for job in self._hashing:
                if job.done():
                    job.result()  # a failed earlier write is raised here, not dropped
            self._hashing = [f for f in self._hashing if not f.done()]
            self._hashing.append(self._hasher.submit(self._write_checksums,
                                                     list(self._unsummed)))
        self._unsummed.clear()

    def _write_checksums(self, steps: list[int]) -> None:
        for step in steps:
            step_dir = self.directory / str(step)
            if step_dir.is_dir():  # not yet removed by the retention policy
                write_checksums(step_dir)

    def _wait_hashing(self, spare_newest: bool = False) -> None:
        """Waits for the checksums being written (all but the newest job with
        spare_newest); a failure to write them is raised here, in the training
        loop's thread."""
        waited = self._hashing[:-1] if spare_newest else self._hashing
        for job in waited:
            job.result()
        self._hashing = self._hashing[len(waited):]

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def verify(self, step: int) -> None:
        """Raises DamagedCheckpointError naming the damaged file of `step`."""
        if step in self._saved:  # its checksums may still be being written
            self._finish_pending()
            self._wait_hashing()
        if step not in self.manager.all_steps():
            raise DamagedCheckpointError(f"no checkpoint {step} under {self.directory}")
        verify_checksums(self.directory / str(step))

    def latest_verified_step(self) -> int | None:
        """The newest step whose checksums verify (None when there are no
        steps); each newer step skipped is named in a warning with its damage.
        DamagedCheckpointError when steps exist but none verifies."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        damage = []
        for step in steps:
            try:
                self.verify(step)
            except DamagedCheckpointError as e:
                damage.append(f"step {step}: {e}")
                continue
            for skipped in damage:
                log.warning("skipping damaged checkpoint %s; using step %d", skipped, step)
            return step
        if damage:
            raise DamagedCheckpointError(f"no intact checkpoint under {self.directory} ("
                                         + "; ".join(damage) + ")")
        return None

    def intact_step(self, step: int | None = None) -> int:
        """`step` once verified (DamagedCheckpointError if damaged), or for
        None the latest intact step: what a command that reads a run
        restores. FileNotFoundError when there is none."""
        if step is not None:
            self.verify(step)
            return step
        latest = self.latest_verified_step()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        return latest

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

    def tree_metadata(self, step: int) -> dict:
        """The tree checkpoint `step` holds, as nested dicts whose leaves
        carry each array's .shape and .dtype; reads no array."""
        return ocp.StandardCheckpointHandler().metadata(self.directory / str(step)
                                                        / DEFAULT_ITEM_NAME)

    def close(self) -> None:
        self._finish_pending()
        self._wait_hashing()
        self._hasher.shutdown()
        self.manager.close()
