"""Everything the user sees while a run progresses: progress lines, tables, JSON files."""
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lirdrec_jax import progress


def log(message: str) -> None:
    """One progress line on stdout, flushed at once (runs are watched live, e.g. on Colab),
    above any progress bar on screen."""
    progress.write(message)


def epoch_line(epoch: int, loss: float, train_seconds: float, eval_seconds: float,
               valid: dict, test: dict, improved: bool, metric: str) -> str:
    mark = '  * best' if improved else ''
    return (f'epoch {epoch:4d}  loss {loss:.4f}  train {train_seconds:6.2f}s  '
            f'eval {eval_seconds:5.2f}s  valid {metric} {valid[metric]:.4f}  '
            f'test {metric} {test[metric]:.4f}{mark}')


def metrics_table(rows: Iterable[tuple], metrics: Iterable[str], ks: Iterable[int]) -> str:
    """A fixed-width table: one line per (label, metric), one column per cutoff.

    Args:
      rows: (label, result dict with keys like 'recall@20') pairs.
    """
    ks = list(ks)
    header = f'{"":28s}' + ''.join(f'{"@" + str(k):>9s}' for k in ks)
    lines = [header, '-' * len(header)]
    for label, result in rows:
        for metric in metrics:
            cells = ''.join(f'{result[f"{metric}@{k}"]:9.4f}' for k in ks)
            lines.append(f'{label + " " + metric:28s}{cells}')
    return '\n'.join(lines)


def grid_table(points: list, keys: list, metric: str) -> str:
    """One line per grid point: its values and the valid/test score of its best epoch."""
    widths = [max(len(k), 10) for k in keys]
    header = '  '.join(f'{k:>{w}s}' for k, w in zip(keys, widths))
    header += f'  {"best ep":>7s}  {"valid " + metric:>16s}  {"test " + metric:>15s}'
    lines = [header, '-' * len(header)]
    for point in points:
        vals = '  '.join(f'{str(point["values"][k]):>{w}s}' for k, w in zip(keys, widths))
        lines.append(f'{vals}  {point["best_epoch"]:7d}  {point["best_valid"][metric]:16.4f}'
                     f'  {point["best_test"][metric]:15.4f}')
    return '\n'.join(lines)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename): an interrupted write never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_json_lines(path: Path, payloads: Iterable[Any]) -> None:
    """Write one JSON line per payload atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(json.dumps(p, sort_keys=True) + '\n' for p in payloads))
    os.replace(tmp, path)


def write_npz(path: Path, arrays: dict) -> None:
    """Write numpy arrays to an .npz atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def append_json_line(path: Path, payload: Any) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(payload, sort_keys=True) + '\n')
