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

Resuming restores the newest checkpoint that reads back completely. A newer one that does not
(a damaged disk, a file edited or truncated by hand) is moved to `unreadable/`, and checkpoints
newer than the restored epoch (e.g. a `best/7` left after `last/7` was deleted by hand) to
`superseded/`: the resumed run writes those epochs again, and nothing on disk is deleted.
"""
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=('state', 'progress'))


class CheckpointError(ValueError):
    """No checkpoint of a run can be read."""


class Restored(NamedTuple):
    epoch: int       # epochs done at the checkpoint
    state: Any
    progress: dict


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = re.sub(r'\s+', ' ', f'{type(err).__name__}: {err}').strip()
    return text if len(text) <= limit else text[:limit - 3] + '...'


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

    def restore(self, abstract_state: Any, best: bool = False,
                epoch: Optional[int] = None) -> tuple:
        """Restore (state, progress) of the latest (or the best, or the given) checkpoint.

        Args:
          abstract_state: a pytree with the structure, shapes and dtypes of the saved state
            (e.g. the freshly initialised state); orbax restores into that structure.
        """
        manager = self.best if best else self.last
        epoch = manager.latest_step() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f'no checkpoint under {manager.directory}')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
        return restored.state, restored.progress

    def restore_intact(self, abstract_state: Any,
                       warn: Callable[[str], None]) -> Optional['Restored']:
        """The newest `last` checkpoint that reads back completely, or None if there is none.

        Unreadable newer checkpoints are moved to `unreadable/` with a warning naming them;
        `last` and `best` checkpoints newer than the restored one to `superseded/`. If no
        checkpoint reads back, nothing is moved and CheckpointError names each one's failure
        (the same failure everywhere usually means the config or the code changed, not damage).
        """
        failures = []
        for epoch in sorted(self.last.all_steps(), reverse=True):
            try:
                state, progress = self.restore(abstract_state, epoch=epoch)
            except Exception as err:  # orbax/TensorStore raise many types for a damaged file
                failures.append((epoch, _first_line(err)))
                continue
            for bad, reason in failures:
                aside = self._move_aside(self.last, bad, 'unreadable')
                warn(f'warning: checkpoint {self.directory / "last" / str(bad)} cannot be read '
                     f'({reason}); moved to {aside}; resuming from the one after epoch '
                     f'{epoch - 1}')
            for manager, name in ((self.last, 'last'), (self.best, 'best')):
                for newer in [s for s in manager.all_steps() if s > epoch]:
                    aside = self._move_aside(manager, newer, 'superseded')
                    warn(f'note: {self.directory / name / str(newer)} is newer than the '
                         f'checkpoint resumed from; moved to {aside}')
            return Restored(epoch, state, progress)
        if failures:
            listing = '; '.join(f'last/{e}: {reason}' for e, reason in failures)
            raise CheckpointError(
                f'no checkpoint under {self.directory / "last"} can be read ({listing}); if the '
                'config or the code changed since they were written, resume with the config '
                'they were written with, or start a new run')
        return None

    def _move_aside(self, manager: ocp.CheckpointManager, epoch: int, kind: str) -> Path:
        """Move checkpoint `epoch` of `manager` to `<ckpt>/<kind>/<last|best>-<epoch>[-n]` and
        make orbax forget it."""
        source = Path(manager.directory) / str(epoch)
        folder = self.directory / kind
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f'{source.parent.name}-{epoch}'
        n = 1
        while target.exists():
            target = folder / f'{source.parent.name}-{epoch}-{n}'
            n += 1
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass  # moved by another process of a multi-process run, which reads the same files
        manager.reload()
        return target

    def close(self) -> None:
        self.last.close()
        self.best.close()
