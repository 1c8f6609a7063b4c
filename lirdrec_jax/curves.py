"""TensorBoard curves of a grid point: its epoch records as scalars, beside its metrics.jsonl.

Each point directory holds one TensorBoard event file (`tensorboard --logdir RUN_DIR` shows the
points as runs `point-000`, `point-001`, ...). Per epoch (the step is the 0-based epoch):
  train/loss, train/learning_rate, train/seconds,
  valid/<metric>_at_<k>, test/<metric>_at_<k>, eval/seconds   (on evaluated epochs; '@' is
      not allowed in TensorBoard tags: recall@20 is valid/recall_at_20),
  model/<name>   the model's own host scalars (e.g. LIRDRec's PWC weights).
The event file always holds exactly the epochs of metrics.jsonl: a resumed point writes its
checkpoint's history into a new file and then removes the older ones (epochs trained after the
last checkpoint of an interrupted run are trained again and must not show twice).

The writer is tensorboardX (no TensorFlow); `checkpoint.tensorboard = False` turns it off.
"""
from pathlib import Path
from typing import Iterable, List, Tuple

EVENT_FILE_GLOB = 'events.out.tfevents.*'
# Record fields that are not curves, or that are written under their own tags.
_RECORD_FIELDS = {'epoch', 'loss', 'learning_rate', 'train_seconds', 'valid', 'test',
                  'eval_seconds'}


def record_scalars(record: dict) -> List[Tuple[str, float]]:
    """(tag, value) pairs of one metrics.jsonl record."""
    scalars = [('train/loss', record['loss']), ('train/learning_rate', record['learning_rate']),
               ('train/seconds', record['train_seconds'])]
    for split in ('valid', 'test'):
        scalars += [(f'{split}/{metric_tag(name)}', value)
                    for name, value in record.get(split, {}).items()]
    if 'eval_seconds' in record:
        scalars.append(('eval/seconds', record['eval_seconds']))
    scalars += [(f'model/{name}', value) for name, value in sorted(record.items())
                if name not in _RECORD_FIELDS and _is_number(value)]
    return [(tag, float(value)) for tag, value in scalars]


def metric_tag(name: str) -> str:
    """'recall@20' -> 'recall_at_20' (TensorBoard tags allow letters, digits, '_', '-', '.', '/')."""
    return name.replace('@', '_at_')


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PointCurves:
    """The event file of one point directory (nothing is written when `enabled` is False)."""

    def __init__(self, point_dir: Path, enabled: bool):
        self.point_dir, self.enabled = Path(point_dir), enabled
        self._writer = None

    def restart(self, history: Iterable[dict]) -> None:
        """A new event file holding exactly `history`; older event files of the point go."""
        if not self.enabled:
            return
        self.close()
        older = set(self.point_dir.glob(EVENT_FILE_GLOB))
        from tensorboardX import SummaryWriter  # imported only when curves are written
        self._writer = SummaryWriter(logdir=str(self.point_dir), flush_secs=30)
        for record in history:
            self._add(record)
        self._writer.flush()
        for path in older:
            path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        """One epoch's scalars, flushed (a run is watched while it trains)."""
        if self._writer is None:
            return
        self._add(record)
        self._writer.flush()

    def _add(self, record: dict) -> None:
        for tag, value in record_scalars(record):
            self._writer.add_scalar(tag, value, global_step=int(record['epoch']))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
