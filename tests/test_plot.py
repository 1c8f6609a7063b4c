"""Figures of a run directory: the drawn data against the run's own files, hand-built runs for
the edge cases (evaluation gaps, interrupted, diverged and empty points, a broken metrics line),
and the command."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from lirdrec_jax import experiment, plot
from tests.conftest import write_small_dataset

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
LEARNING_RATES = (0.005, 0.01)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A real 2-point grid (two learning rates, one seed) of 3 epochs on a small dataset."""
    root = tmp_path_factory.mktemp('plot')
    write_small_dataset(root / 'data')
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(root / 'data'), 'small'
    cfg.checkpoint.output_dir, cfg.checkpoint.run_name = str(root / 'out'), 'run'
    cfg.train.epochs = 3
    cfg.optim.learning_rate = LEARNING_RATES
    cfg.hyper_parameters = ('optim.learning_rate', 'train.seed')
    experiment.run(cfg)
    return root / 'out' / 'run'


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def run_command(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop('LIRDREC_JAX_TRACEBACK', None)
    return subprocess.run([sys.executable, '-m', 'lirdrec_jax.plot', *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith('error:')]


# ----------------------------------------------------------------------------------------------
# A real run
# ----------------------------------------------------------------------------------------------

def test_point_figures_draw_the_metrics_lines(run_dir):
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['valid_metric'] == 'recall@20'
    figures = plot.plot_run(run_dir, log=lambda message: None)
    assert sorted(figures) == ['grid', 'point-000', 'point-001']
    for point in results['points']:
        records = read_records(run_dir / f'point-{point["index"]:03d}' / 'metrics.jsonl')
        evaluated = [r for r in records if 'valid' in r]
        top, bottom = figures[f'point-{point["index"]:03d}'].axes
        loss = lines_by_label(top)['loss']
        np.testing.assert_array_equal(loss.get_xdata(), [r['epoch'] for r in records])
        np.testing.assert_array_equal(loss.get_ydata(), [r['loss'] for r in records])
        drawn = lines_by_label(bottom)
        for metric in ('recall@20', 'ndcg@20'):
            line = drawn[f'valid {metric}']
            np.testing.assert_array_equal(line.get_xdata(), [r['epoch'] for r in evaluated])
            np.testing.assert_array_equal(line.get_ydata(),
                                          [r['valid'][metric] for r in evaluated])
        for ax in (top, bottom):
            vertical = lines_by_label(ax)['best epoch']
            assert list(vertical.get_xdata()) == [point['best_epoch']] * 2
        star = drawn['best']
        assert list(star.get_xdata()) == [point['best_epoch']]
        assert list(star.get_ydata()) == [point['best_valid']['recall@20']]


def test_grid_figure_shows_the_best_score_per_value(run_dir):
    results = json.loads((run_dir / 'results.json').read_text())
    figure = plot.plot_run(run_dir, log=lambda message: None)['grid']
    # train.seed takes one value: only the learning rate gets a panel.
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == 1 and panels[0].get_xlabel() == 'optim.learning_rate'
    by_rate = {}
    for p in results['points']:
        rate = p['values']['optim.learning_rate']
        by_rate[rate] = max(by_rate.get(rate, -math.inf), p['best_valid']['recall@20'])
    rates = sorted(by_rate)
    drawn = lines_by_label(panels[0])
    line = drawn['best valid recall@20']
    np.testing.assert_array_equal(line.get_xdata(), np.arange(len(rates)))
    np.testing.assert_array_equal(line.get_ydata(), [by_rate[r] for r in rates])
    assert [t.get_text() for t in panels[0].get_xticklabels()] == [f'{r:g}' for r in rates]
    best = max(results['points'], key=lambda p: p['best_valid']['recall@20'])
    assert best['index'] == results['best_point']
    star = drawn['best point']
    assert list(star.get_xdata()) == [rates.index(best['values']['optim.learning_rate'])]
    assert list(star.get_ydata()) == [best['best_valid']['recall@20']]


def test_command_writes_pngs_from_another_folder(run_dir, tmp_path):
    out = run_command(run_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plots = run_dir / 'plots'
    expected = [plots / name for name in ('point-000.png', 'point-001.png', 'grid.png')]
    lines = out.stdout.splitlines()
    assert lines[:3] == [str(p) for p in expected]
    assert len(lines) == 4 and lines[3].startswith('wrote 3 figures')
    assert sorted(os.listdir(plots)) == sorted(p.name for p in expected)  # no temp files left
    for path in expected:
        assert path.read_bytes()[:8] == PNG_MAGIC
    # --out, relative to the working folder, is created.
    out = run_command(run_dir, '--out', 'figs/run', cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / 'figs' / 'run')) == sorted(p.name for p in expected)


def test_command_refuses_a_folder_that_is_not_a_run(run_dir, tmp_path):
    for path in (tmp_path, tmp_path / 'missing', run_dir.parent):
        with pytest.raises(FileNotFoundError, match='run directory: ...'):
            plot.plot_run(path, log=lambda message: None)
    out = run_command(run_dir.parent, cwd=tmp_path)
    assert out.returncode == 1
    assert 'Traceback' not in out.stderr
    errors = error_lines(out.stderr)
    assert len(errors) == 1 and str(run_dir.parent) in errors[0]
    assert 'is not a run directory' in errors[0] and 'run directory: ...' in errors[0]
    assert out.stdout == ''


# ----------------------------------------------------------------------------------------------
# Hand-built runs
# ----------------------------------------------------------------------------------------------

def record(epoch, loss, recall=None, ndcg=None):
    r = {'epoch': epoch, 'loss': loss, 'learning_rate': 0.001, 'train_seconds': 0.1}
    if recall is not None:
        r.update(valid={'recall@10': recall, 'ndcg@10': ndcg},
                 test={'recall@10': recall / 2, 'ndcg@10': ndcg / 2}, eval_seconds=0.1)
    return r


def write_point(run, index, records=None, result=None, config=None):
    folder = run / f'point-{index:03d}'
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps(config or {}))
    if records is not None:
        (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    if result is not None:
        (folder / 'result.json').write_text(json.dumps(result))
    return folder


def test_evaluation_gaps_and_a_run_without_results_json(tmp_path):
    """eval_step 2, still running: no results.json, the metric and grid from config.json."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.json').write_text(json.dumps(
        {'eval': {'valid_metric': 'Recall@10'}, 'hyper_parameters': ['model.reg_weight']}))
    records = [record(0, 9.0), record(1, 8.0, 0.20, 0.10), record(2, 7.5),
               record(3, 7.0, 0.25, 0.12), record(4, 6.8), record(5, 6.7, 0.25, 0.13)]
    write_point(run, 0, records, config={'model': {'reg_weight': 0.1}})
    write_point(run, 1, records[:2], config={'model': {'reg_weight': 0.01}})

    curves = plot.point_curves(records, 'recall@10')
    np.testing.assert_array_equal(curves.epochs, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(curves.eval_epochs, [1, 3, 5])
    np.testing.assert_array_equal(curves.valid, [0.20, 0.25, 0.25])
    np.testing.assert_array_equal(curves.valid_ndcg, [0.10, 0.12, 0.13])
    assert curves.best_epoch == 3  # the first of equal scores, as early stopping keeps it

    notes = []
    figures = plot.plot_run(run, log=notes.append)
    assert notes == []
    top, bottom = figures['point-000'].axes
    np.testing.assert_array_equal(lines_by_label(top)['loss'].get_xdata(), [0, 1, 2, 3, 4, 5])
    valid = lines_by_label(bottom)['valid recall@10']
    np.testing.assert_array_equal(valid.get_xdata(), [1, 3, 5])
    assert list(lines_by_label(bottom)['best epoch'].get_xdata()) == [3, 3]
    assert 'reg_weight=0.1' in figures['point-000'].get_suptitle()
    assert 'unfinished' in figures['point-000'].get_suptitle()
    # The grid from the records so far: point 0's best 0.25 at reg 0.1, point 1's 0.20 at 0.01.
    assert plot.grid_summary(plot.read_run(run)[0]) == {
        'model.reg_weight': [(0.01, 0.20), (0.1, 0.25)]}
    grid = lines_by_label(figures['grid'].axes[0])['best valid recall@10']
    np.testing.assert_array_equal(grid.get_ydata(), [0.20, 0.25])


def test_interrupted_diverged_and_empty_points(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    finished = [record(0, 5.0, 0.30, 0.20), record(1, 4.0, 0.35, 0.22),
                record(2, 3.9, 0.34, 0.23)]
    interrupted = [record(0, 6.0, 0.10, 0.05), record(1, 5.0, 0.12, 0.06),
                   record(2, 4.5, 0.18, 0.07)]
    values = [{'model.reg_weight': w, 'train.seed': 1} for w in (0.1, 0.1, 0.01, 0.001)]
    result0 = {'index': 0, 'values': values[0], 'finished': True, 'epochs_done': 3,
               'best_epoch': 1, 'best_valid': {'recall@10': 0.35}, 'best_test': {}}
    diverged = {'index': 2, 'values': values[2], 'finished': True, 'best_epoch': -1,
                'diverged': 'training loss is nan at epoch 1, batch 0', 'best_valid': None,
                'best_test': None}
    write_point(run, 0, finished, result0)
    write_point(run, 1, interrupted)  # no result.json: its records are the truth
    write_point(run, 2, finished[:1], diverged)
    write_point(run, 3)  # opened, no epoch yet
    # results.json of an earlier, interrupted invocation: point 1 stood at epoch 0 then.
    stale = {'index': 1, 'values': values[1], 'finished': False, 'best_epoch': 0,
             'best_valid': {'recall@10': 0.10}}
    (run / 'results.json').write_text(json.dumps({
        'valid_metric': 'recall@10', 'hyper_parameters': ['model.reg_weight', 'train.seed'],
        'points': [result0, stale, diverged,
                   {'index': 3, 'values': values[3], 'finished': False, 'best_epoch': -1,
                    'best_valid': None}],
        'best_point': 0, 'finished': False}))

    notes = []
    figures = plot.plot_run(run, log=notes.append)
    assert sorted(figures) == ['grid', 'point-000', 'point-001']
    assert len(notes) == 2
    assert notes[0].startswith('point-002: skipped') and 'diverged' in notes[0]
    assert notes[1].startswith('point-003: skipped') and 'no epoch records' in notes[1]
    # The finished point: its result's best epoch; the interrupted one: its records' best.
    assert list(lines_by_label(figures['point-000'].axes[1])['best'].get_xdata()) == [1]
    interrupted_bottom = lines_by_label(figures['point-001'].axes[1])
    assert list(interrupted_bottom['best epoch'].get_xdata()) == [2, 2]
    assert list(interrupted_bottom['best'].get_ydata()) == [0.18]
    # Grid: reg 0.1 -> max(0.35, 0.18); 0.01 only diverged, 0.001 not evaluated -> NaN.
    summary = plot.grid_summary(plot.read_run(run)[0])
    assert list(summary) == ['model.reg_weight']
    assert [v for v, _ in summary['model.reg_weight']] == [0.001, 0.01, 0.1]
    scores = [s for _, s in summary['model.reg_weight']]
    assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] == 0.35
    star = lines_by_label(figures['grid'].axes[0])['best point']
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [0.35]
    # The command: the notes, then the files, then the summary.
    plot.main([str(run), '--out', str(tmp_path / 'figures')])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == notes
    assert lines[2:5] == [str(tmp_path / 'figures' / f'{name}.png')
                          for name in ('point-000', 'point-001', 'grid')]
    assert lines[5].endswith('2 points and the grid; 2 points skipped (see above)')
    assert len(lines) == 6


def test_grid_summary_takes_the_best_over_other_fields_and_seeds():
    scores = {(0.1, 2, 1): 0.30, (0.1, 2, 2): 0.31, (0.1, 3, 1): 0.28, (0.1, 3, 2): 0.29,
              (0.01, 2, 1): 0.33, (0.01, 2, 2): 0.32, (0.01, 3, 1): 0.27, (0.01, 3, 2): 0.26}
    points = [{'index': i, 'values': {'model.reg_weight': w, 'model.n_layers': n,
                                      'train.seed': s, 'model.dim': 64},
               'best_valid': {'ndcg@20': score}}
              for i, ((w, n, s), score) in enumerate(scores.items())]
    results = {'valid_metric': 'ndcg@20', 'points': points,
               'hyper_parameters': ['model.reg_weight', 'model.n_layers', 'model.dim',
                                    'train.seed']}
    assert plot.grid_summary(results) == {
        'model.reg_weight': [(0.01, 0.33), (0.1, 0.31)],
        'model.n_layers': [(2, 0.33), (3, 0.29)],
        'train.seed': [(1, 0.33), (2, 0.32)]}
    one_value = dict(results, points=[p for p in points if p['values']['train.seed'] == 1
                                      and p['values']['model.n_layers'] == 2
                                      and p['values']['model.reg_weight'] == 0.1])
    assert plot.grid_summary(one_value) == {}  # nothing swept: no grid figure
    figure = plot.grid_figure(plot.grid_summary(results), 'ndcg@20',
                              plot.best_point(results)['values'])
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in panels] == ['model.reg_weight', 'model.n_layers',
                                                 'train.seed']
    # The best point (reg 0.01, 2 layers, seed 1) is starred in every panel at its value.
    assert [list(lines_by_label(ax)['best point'].get_xdata()) for ax in panels] == [[0]] * 3


def test_a_broken_metrics_line_is_named(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.json').write_text(json.dumps({'eval': {'valid_metric': 'recall@10'}}))
    folder = write_point(run, 0, [record(0, 5.0, 0.3, 0.2)])
    with open(folder / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": 1, "loss": 4.\n')
    path = folder / 'metrics.jsonl'
    with pytest.raises(ValueError, match=f'{path}:2: '):
        plot.plot_run(run, log=lambda message: None)
    out = run_command(run, cwd=tmp_path)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    errors = error_lines(out.stderr)
    assert len(errors) == 1 and f'{path}:2' in errors[0]
    assert not (run / 'plots').exists()
