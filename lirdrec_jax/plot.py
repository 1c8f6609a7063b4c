"""Figures of a run directory: `python -m lirdrec_jax.plot RUN_DIR [--out DIR]`.

RUN_DIR is what `python -m lirdrec_jax.main` prints as `run directory: ...`. Writes PNG files
into DIR (default RUN_DIR/plots, created if needed) and prints the path of each:

  point-NNN.png  one per grid point: the training loss per epoch (top) and, per evaluated
                 epoch, the valid metric of the run (e.g. recall@20) and NDCG at the same k
                 (bottom); the best valid epoch is marked. A point still running or
                 interrupted shows the epochs it has done; a diverged point, or one without
                 epoch records, is skipped with a note.
  grid.png       for a run whose grid sweeps at least one field: one panel per swept field,
                 the best valid score among the points with each of its values.

The library functions (`plot_run`, `point_figure`, `grid_figure`) return matplotlib Figures
without touching pyplot's global state, so a notebook can display them.
"""
import argparse
import json
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lirdrec_jax import reporting

POINT_GLOB = 'point-[0-9][0-9][0-9]'


# ----------------------------------------------------------------------------------------------
# Reading a run directory
# ----------------------------------------------------------------------------------------------

def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{path} is not valid JSON: {err}') from None
    if not isinstance(payload, dict):
        raise ValueError(f'{path} holds a {type(payload).__name__}, expected a JSON object')
    return payload


def read_metrics(path: Path) -> List[dict]:
    """The epoch records of a point's metrics.jsonl (empty if the file does not exist).

    Raises ValueError naming `file:line` for a line that is not a JSON object with 'epoch' and
    'loss'. Blank lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    # Undecodable bytes become U+FFFD, so that the line they are on is the one reported.
    for number, line in enumerate(path.read_text(errors='replace').splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f'{path}:{number}: not a JSON line ({err.msg}): '
                             f'{textwrap.shorten(line, 60)}') from None
        if not isinstance(record, dict) or 'epoch' not in record or 'loss' not in record:
            raise ValueError(f'{path}:{number}: expected a JSON object with "epoch" and "loss" '
                             f'(an epoch record), got {textwrap.shorten(line, 60)}')
        records.append(record)
    return records


def point_dirs(run_dir: Path) -> List[Path]:
    """The run's point-NNN folders, in index order."""
    return sorted(p for p in Path(run_dir).glob(POINT_GLOB) if p.is_dir())


def check_run_directory(run_dir: Path) -> None:
    """Raises FileNotFoundError unless `run_dir` holds results.json or a point's metrics.jsonl."""
    run_dir = Path(run_dir)
    hint = ('a run directory is what `python -m lirdrec_jax.main` prints as '
            '`run directory: ...`')
    if not run_dir.exists():
        raise FileNotFoundError(f'{run_dir} does not exist; {hint}')
    if not run_dir.is_dir():
        raise FileNotFoundError(f'{run_dir} is not a directory; {hint}')
    if not ((run_dir / 'results.json').exists()
            or any((p / 'metrics.jsonl').exists() for p in point_dirs(run_dir))):
        raise FileNotFoundError(f'{run_dir} is not a run directory (it holds no results.json '
                                f'and no point-NNN/metrics.jsonl); {hint}')


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_settings(results: Optional[dict], run_config: Optional[dict], run_dir: Path) -> tuple:
    """(valid metric, hyper-parameter names) of a run: from results.json, or while the run has
    not written it yet, from its config.json."""
    if results is not None and 'valid_metric' in results:
        return results['valid_metric'].lower(), list(results.get('hyper_parameters', []))
    metric = _lookup(run_config or {}, 'eval.valid_metric')
    if not isinstance(metric, str):
        raise ValueError(f'{run_dir}: neither results.json nor config.json names the valid '
                         'metric (results.json "valid_metric", config.json eval.valid_metric)')
    return metric.lower(), list((run_config or {}).get('hyper_parameters', []))


class PointData(NamedTuple):
    """What a run directory holds about one grid point.

    Attributes:
      name: 'point-NNN'.
      index: the point's index in the grid.
      values: {hyper-parameter: value} of the point.
      result: its result once finished (result.json, or its results.json entry with
        'finished'), else None.
      records: the epoch records of its metrics.jsonl, in file order.
      path: its metrics.jsonl.
    """
    name: str
    index: int
    values: dict
    result: Optional[dict]
    records: List[dict]
    path: Path


def read_point(run_dir: Path, index: int, entry: Optional[dict],
               hyper_parameters: List[str]) -> PointData:
    """The files of point `index`; `entry` is its results.json entry if there is one."""
    folder = Path(run_dir) / f'point-{index:03d}'
    result = read_json(folder / 'result.json')
    if result is None and entry is not None and entry.get('finished'):
        result = entry
    values = (entry or result or {}).get('values')
    if values is None:
        config = read_json(folder / 'config.json') or {}
        values = {k: _lookup(config, k) for k in hyper_parameters}
    return PointData(folder.name, index, values, result,
                      read_metrics(folder / 'metrics.jsonl'), folder / 'metrics.jsonl')


# ----------------------------------------------------------------------------------------------
# What is drawn (pure)
# ----------------------------------------------------------------------------------------------

class PointCurves(NamedTuple):
    """The curves of one point's figure.

    Attributes:
      epochs: (E,) int, the recorded epochs (0-based, as in the progress lines).
      loss: (E,) float, the summed training loss of each epoch.
      eval_epochs: (V,) int, the epochs with a validation result.
      valid: (V,) float, the run's valid metric (`metric`) at those epochs.
      valid_ndcg: (V,) float, NDCG at the same k (`ndcg_metric`); NaN where not recorded.
      best_epoch: the best valid epoch, or None when no epoch was evaluated.
      metric: the valid metric's name, e.g. 'recall@20'.
      ndcg_metric: e.g. 'ndcg@20'.
    """
    epochs: np.ndarray
    loss: np.ndarray
    eval_epochs: np.ndarray
    valid: np.ndarray
    valid_ndcg: np.ndarray
    best_epoch: Optional[int]
    metric: str
    ndcg_metric: str


def ndcg_at_same_k(metric: str) -> str:
    """'recall@20' -> 'ndcg@20'."""
    name, sep, k = metric.partition('@')
    if not sep or not k.isdigit():
        raise ValueError(f'valid metric {metric!r} is not of the form name@k (e.g. recall@20)')
    return f'ndcg@{k}'


def best_valid_epoch(eval_epochs: np.ndarray, valid: np.ndarray) -> Optional[int]:
    """The first epoch with the highest valid score (the trainer keeps the first of equal
    scores: only a strictly better one replaces the best); None with no evaluation."""
    if len(eval_epochs) == 0:
        return None
    return int(eval_epochs[int(np.argmax(valid))])


def point_curves(records: List[dict], valid_metric: str,
                 best_epoch: Optional[int] = None) -> PointCurves:
    """The curves of a point from its epoch records (metrics.jsonl).

    Args:
      records: epoch records, each with 'epoch', 'loss' and, on evaluated epochs, 'valid'.
      valid_metric: the run's valid metric, e.g. 'recall@20'.
      best_epoch: the point's best epoch from its result; None (or a negative value, as a
        point without evaluation reports) takes the best valid epoch of the records.
    """
    metric = valid_metric.lower()
    ndcg = ndcg_at_same_k(metric)
    records = sorted(records, key=lambda r: r['epoch'])
    evaluated = [r for r in records if r.get('valid')]
    for r in evaluated:
        if metric not in r['valid']:
            raise ValueError(f'epoch {r["epoch"]}: the valid metrics have no {metric!r} '
                             f'(they have {sorted(r["valid"])})')
    eval_epochs = np.array([r['epoch'] for r in evaluated], dtype=np.int64)
    valid = np.array([r['valid'][metric] for r in evaluated], dtype=np.float64)
    if best_epoch is None or best_epoch < 0:
        best_epoch = best_valid_epoch(eval_epochs, valid)
    return PointCurves(
        epochs=np.array([r['epoch'] for r in records], dtype=np.int64),
        loss=np.array([r['loss'] for r in records], dtype=np.float64),
        eval_epochs=eval_epochs, valid=valid,
        valid_ndcg=np.array([r['valid'].get(ndcg, math.nan) for r in evaluated],
                            dtype=np.float64),
        best_epoch=best_epoch, metric=metric, ndcg_metric=ndcg)


def swept_fields(results: dict) -> List[str]:
    """The hyper-parameters that take more than one value among the run's points."""
    points = results.get('points', [])
    return [k for k in results.get('hyper_parameters', [])
            if len({json.dumps(p['values'].get(k), sort_keys=True) for p in points}) > 1]


def _sort_key(value):
    # Numbers by value (bools are numbers here), everything else after them by its text.
    if isinstance(value, (int, float)):
        return (0, float(value), '')
    return (1, 0.0, json.dumps(value, sort_keys=True))


def grid_summary(results: dict) -> Dict[str, List[tuple]]:
    """{swept field: [(value, best score)]}, values sorted: the best valid score
    (results['valid_metric']) among the points with that value, over all other fields and
    seeds. Points without a validation result (diverged, not evaluated yet) are left out; a
    value none of whose points has one scores NaN. Fields with one value are left out."""
    metric = results['valid_metric'].lower()
    summary = {}
    for field in swept_fields(results):
        best = {}
        for p in results['points']:
            value = p['values'].get(field)
            key = json.dumps(value, sort_keys=True)
            score = (p.get('best_valid') or {}).get(metric, math.nan)
            old = best.get(key, (value, math.nan))[1]
            best[key] = (value, score if math.isnan(old) or score > old else old)
        summary[field] = sorted(best.values(), key=lambda vs: _sort_key(vs[0]))
    return summary


def best_point(results: dict) -> Optional[dict]:
    """The point with the highest valid score, or None if no point has one."""
    metric = results['valid_metric'].lower()
    scored = [p for p in results['points'] if (p.get('best_valid') or {}).get(metric) is not None]
    return max(scored, key=lambda p: p['best_valid'][metric]) if scored else None


def format_value(value) -> str:
    return f'{value:g}' if isinstance(value, float) else str(value)


def point_title(point: PointData, curves: PointCurves) -> str:
    """'point-001: optim.learning_rate=0.01, ...' and the best epoch and score."""
    values = ', '.join(f'{k}={format_value(v)}' for k, v in point.values.items())
    title = point.name + (f': {values}' if values else '')
    title = '\n'.join(textwrap.wrap(title, 90))
    if curves.best_epoch is not None and curves.best_epoch in curves.eval_epochs:
        score = curves.valid[list(curves.eval_epochs).index(curves.best_epoch)]
        title += f'\nbest epoch {curves.best_epoch}: valid {curves.metric} {score:.4f}'
    if point.result is None:
        title += f' (unfinished, {len(curves.epochs)} epochs so far)'
    return title


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

def point_figure(curves: PointCurves, title: str) -> Figure:
    """Loss per epoch (top) and valid scores per evaluated epoch (bottom), one epoch axis; the
    best epoch marked by a dashed vertical line in both panels and a star on the valid curve.

    Line labels: 'loss', 'valid <metric>', 'valid <ndcg metric>' (omitted when the valid
    metric is that NDCG or it was not recorded), 'best epoch', 'best'."""
    fig = Figure(figsize=(7.0, 6.0), layout='constrained')
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(curves.epochs, curves.loss, marker='.', color='tab:gray', label='loss')
    top.set_ylabel('training loss')
    bottom.plot(curves.eval_epochs, curves.valid, marker='o', color='tab:blue',
                label=f'valid {curves.metric}')
    if curves.ndcg_metric != curves.metric and not np.all(np.isnan(curves.valid_ndcg)):
        bottom.plot(curves.eval_epochs, curves.valid_ndcg, marker='s', color='tab:orange',
                    label=f'valid {curves.ndcg_metric}')
    if curves.best_epoch is not None:
        for ax in (top, bottom):
            ax.axvline(curves.best_epoch, color='tab:red', linestyle='--', linewidth=1,
                       label='best epoch')
        hit = np.flatnonzero(curves.eval_epochs == curves.best_epoch)
        if hit.size:
            bottom.plot([curves.best_epoch], [curves.valid[hit[0]]], marker='*', markersize=14,
                        color='tab:red', linestyle='none', label='best')
    bottom.set_xlabel('epoch')
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel('valid score')
    if len(curves.eval_epochs):
        bottom.legend(loc='best', fontsize='small')
    else:
        bottom.text(0.5, 0.5, 'no evaluated epoch yet', ha='center', va='center',
                    transform=bottom.transAxes)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize='medium')
    return fig


def grid_figure(summary: Dict[str, List[tuple]], metric: str,
                best_values: Optional[dict] = None) -> Figure:
    """One panel per swept field: x its values (categorical positions, values as tick labels),
    y the best valid `metric` among the points with that value (line label 'best valid
    <metric>'). `best_values` ({field: value}, the best point's) are starred ('best point')."""
    n = len(summary)
    columns = min(n, 3)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows), layout='constrained')
    axes = np.atleast_1d(fig.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    for ax, (field, pairs) in zip(axes, summary.items()):
        x = np.arange(len(pairs))
        y = np.array([score for _, score in pairs], dtype=np.float64)
        ax.plot(x, y, marker='o', color='tab:blue', label=f'best valid {metric}')
        ax.set_xticks(x, [format_value(v) for v, _ in pairs])
        ax.set_xlim(-0.5, len(pairs) - 0.5)
        if best_values is not None and field in best_values:
            keys = [json.dumps(v, sort_keys=True) for v, _ in pairs]
            i = keys.index(json.dumps(best_values[field], sort_keys=True))
            ax.plot([x[i]], [y[i]], marker='*', markersize=16, color='tab:red',
                    linestyle='none', label='best point')
        ax.set_xlabel(field)
        ax.grid(alpha=0.3)
    for ax in axes[:len(summary):columns]:
        ax.set_ylabel(f'best valid {metric}')
    for ax in axes[len(summary):]:
        ax.set_visible(False)
    axes[0].legend(loc='best', fontsize='small')
    fig.suptitle(f'best valid {metric} per value of each swept field', fontsize='medium')
    return fig


# ----------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------

def current_results(results: Optional[dict], points: List[PointData], metric: str,
                    hyper_parameters: List[str]) -> dict:
    """results.json as it stands now: finished points by their result, the others by the best
    valid epoch of their records so far (a run in progress writes results.json at the end)."""
    entries = []
    for p in points:
        if p.result is not None:
            entries.append({**p.result, 'index': p.index, 'values': p.values})
            continue
        curves = point_curves(p.records, metric)
        best = None
        if curves.best_epoch is not None:
            best = {metric: float(curves.valid[list(curves.eval_epochs).index(curves.best_epoch)])}
        entries.append({'index': p.index, 'values': p.values, 'finished': False,
                        'best_epoch': curves.best_epoch, 'best_valid': best})
    return {**(results or {}), 'valid_metric': metric, 'hyper_parameters': hyper_parameters,
            'points': entries}


def read_run(run_dir: Path) -> tuple:
    """(results as they stand now, [PointData]) of a run directory (see `current_results`)."""
    run_dir = Path(run_dir)
    check_run_directory(run_dir)
    results = read_json(run_dir / 'results.json')
    metric, hyper_parameters = run_settings(results, read_json(run_dir / 'config.json'), run_dir)
    entries = {p['index']: p for p in (results or {}).get('points', [])}
    indices = sorted(set(entries) | {int(d.name[len('point-'):]) for d in point_dirs(run_dir)})
    points = [read_point(run_dir, i, entries.get(i), hyper_parameters) for i in indices]
    for p in points:
        try:
            point_curves(p.records, metric)
        except ValueError as err:  # name the file
            raise ValueError(f'{p.path}: {err}') from None
    return current_results(results, points, metric, hyper_parameters), points


def plot_run(run_dir, log: Callable[[str], None] = reporting.log) -> Dict[str, Figure]:
    """The figures of a run directory: {'point-NNN': Figure, ..., 'grid': Figure}.

    Points without epoch records and diverged points get no figure (`log` says so); 'grid'
    only when some hyper-parameter takes more than one value among the points.
    """
    results, points = read_run(Path(run_dir))
    metric = results['valid_metric']
    figures = {}
    for p in points:
        diverged = (p.result or {}).get('diverged')
        if diverged:
            log(f'{p.name}: skipped, it diverged ({diverged})')
            continue
        if not p.records:
            log(f'{p.name}: skipped, no epoch records yet ({p.path} is missing or empty)')
            continue
        best = (p.result or {}).get('best_epoch')
        curves = point_curves(p.records, metric, best)
        figures[p.name] = point_figure(curves, point_title(p, curves))
    summary = grid_summary(results)
    if summary:
        best = best_point(results)
        figures['grid'] = grid_figure(summary, metric, None if best is None else best['values'])
    return figures


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> None:
    """Write `fig` as a PNG atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        fig.savefig(tmp, format='png', dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_plots(figures: Dict[str, Figure], out_dir: Path,
                log: Callable[[str], None] = reporting.log) -> List[Path]:
    """Save each figure of `plot_run` as <out_dir>/<name>.png (out_dir created); `log` gets
    each path once written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out_dir / f'{name}.png'
        save_figure(fig, path)
        log(str(path))
        written.append(path)
    return written


def _count(n: int, noun: str) -> str:
    return f'{n} {noun}' + ('' if n == 1 else 's')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m lirdrec_jax.plot',
                                     description=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', metavar='RUN_DIR', type=Path,
                        help='the run directory (`run directory: ...` of lirdrec_jax.main)')
    parser.add_argument('--out', metavar='DIR', type=Path, default=None,
                        help='where to write the PNG files (default RUN_DIR/plots)')
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')  # headless: no display needed
    out_dir = args.out if args.out is not None else args.run_dir / 'plots'
    skipped = []

    def note(message: str) -> None:
        skipped.append(message)
        reporting.log(message)
    try:
        figures = plot_run(args.run_dir, log=note)
        written = write_plots(figures, out_dir)
    except (ValueError, OSError) as err:
        if os.environ.get('LIRDREC_JAX_TRACEBACK'):
            raise
        sys.exit(f'error: {err}\n(set LIRDREC_JAX_TRACEBACK=1 to see the traceback)')
    points = sum(name.startswith('point-') for name in figures)
    summary = f'wrote {_count(len(written), "figure")} to {out_dir}: {_count(points, "point")}'
    summary += ' and the grid' if 'grid' in figures else ' (no swept field: no grid figure)'
    if skipped:
        summary += f'; {_count(len(skipped), "point")} skipped (see above)'
    reporting.log(summary)


if __name__ == '__main__':
    main()
