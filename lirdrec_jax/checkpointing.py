"""Orbax checkpoints of a training run: the last N epochs and the best one.

Each checkpoint holds two items:
  state:    params, optimiser state, the model's carried state (e.g. LIRDRec's fusion
            attention for the next epoch), and the run's PRNG key data (a pytree of arrays,
            saved with StandardSave);
  progress: host-side training state as JSON (epoch, the model's host state, early-stopping
            counters, best results, per-epoch history).
Orbax writes into a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoints intact; `cleanup_tmp_directories` removes the debris
of such a save when the run is resumed.
"""
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=('state', 'progress'))


class RunCheckpoints:
    """The checkpoints of one training run, under `directory/last` and `directory/best`."""

    def __init__(self, directory: Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f'checkpoint.keep_last must be >= 1, got {keep_last}')
        self.directory = Path(directory)
        self.last = _manager(self.directory / 'last', keep_last)
        self.best = _manager(self.directory / 'best', 1)

    def save(self, epoch: int, state: Any, progress: dict, is_best: bool) -> None:
        """Save after epoch `epoch` (1-based); also as the best checkpoint when `is_best`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  progress=ocp.args.JsonSave(progress))
        self.last.save(epoch, args=args, force=True)
        if is_best:
            self.best.save(epoch, args=args, force=True)

    def latest_epoch(self) -> Optional[int]:
        return self.last.latest_step()

    def restore(self, abstract_state: Any, best: bool = False) -> tuple:
        """Restore (state, progress) of the latest (or the best) checkpoint.

        Args:
          abstract_state: a pytree with the structure, shapes and dtypes of the saved state
            (e.g. the freshly initialised state); orbax restores into that structure.
        """
        manager = self.best if best else self.last
        epoch = manager.latest_step()
        if epoch is None:
            raise FileNotFoundError(f'no checkpoint under {manager.directory}')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
        return restored.state, restored.progress

    def close(self) -> None:
        self.last.close()
        self.best.close()
