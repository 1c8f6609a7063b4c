"""End to end: the command line on a small synthetic dataset, run directories, resume, errors."""
import copy
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from lirdrec_jax import cli, experiment, synthetic, train
from lirdrec_jax import data as data_lib
from tests.conftest import COMPILATION_CACHE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    synthetic.write_synthetic_dataset(root, 'small', n_users=400, n_items=200, seed=1,
                                      image_dim=64, text_dim=48)
    return root


def run_cli(*args, cwd=REPO, repo_on_path=True):
    """`python -m lirdrec_jax.main ARGS` in a subprocess; with `repo_on_path=False` only the
    installed package is importable (no `configs` package of the checkout)."""
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    if repo_on_path:
        env['PYTHONPATH'] = str(REPO)
    cache = os.environ.get(COMPILATION_CACHE, 'off')
    if cache != 'off':  # the programs this process compiled for the same shapes
        env['JAX_COMPILATION_CACHE_DIR'] = cache
    return subprocess.run([sys.executable, '-m', 'lirdrec_jax.main', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def small_config(data_dir, out_dir, **train):
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(data_dir), 'small'
    cfg.checkpoint.output_dir = str(out_dir)
    cfg.checkpoint.run_name = 'run'
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def test_a_run_beats_most_popular_and_prints_its_table(data_dir, tmp_path, capsys):
    summary = experiment.run(small_config(data_dir, tmp_path, epochs=8, stopping_step=8))
    lines = capsys.readouterr().out.splitlines()
    assert sum(l.startswith('epoch ') for l in lines) == 8  # one progress line per epoch
    row = lambda label: [float(x) for x in next(l for l in lines if l.startswith(label)).split()[-4:]]
    model, popular = row('lirdrec test recall'), row('most-popular test recall')
    assert model[2] > 1.2 * popular[2], (model, popular)  # Recall@20
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results == json.loads(json.dumps(summary))
    assert results['finished'] and results['points'][0]['best_test']['recall@20'] == \
        pytest.approx(model[2], abs=5e-5)
    assert results['popularity']['test']['recall@20'] == pytest.approx(popular[2], abs=5e-5)
    assert (tmp_path / 'run' / 'point-000' / 'metrics.jsonl').read_text().count('\n') == 8


def test_command_line_smoke(data_dir, tmp_path):
    """The one test through a real `python -m lirdrec_jax.main` (the others call the same
    functions in this process), from a folder outside the checkout with only the installed
    package importable: a built-in config by name, `--workdir`, the `--config.data_dir` alias,
    progress lines (one per epoch when the output is not a terminal), files; started again with
    the same --workdir, the finished run is reported, not trained again."""
    run_dir = tmp_path / 'my run'
    args = ('--config', 'test', f'--config.data_dir={data_dir}', '--config.data.dataset=small',
            '--workdir', str(run_dir), '--config.train.epochs=2',
            '--config.train.stopping_step=8')
    out = run_cli(*args, cwd=tmp_path, repo_on_path=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(l.startswith('epoch ') for l in lines) == 2  # one progress line per epoch
    results = json.loads((run_dir / 'results.json').read_text())
    printed = next(l for l in lines if l.startswith('lirdrec test recall')).split()[-4:]
    assert results['finished'] and results['points'][0]['best_epoch'] in (0, 1)
    assert float(printed[2]) == round(results['points'][0]['best_test']['recall@20'], 4)
    metrics = (run_dir / 'point-000' / 'metrics.jsonl').read_text()
    assert metrics.count('\n') == 2
    again = run_cli(*args, cwd=tmp_path, repo_on_path=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'finished earlier' in again.stdout and not any(
        l.startswith('epoch ') for l in again.stdout.splitlines())
    assert next(l for l in again.stdout.splitlines()
                if l.startswith('lirdrec test recall')).split()[-4:] == printed
    assert (run_dir / 'point-000' / 'metrics.jsonl').read_text() == metrics


def import_main(monkeypatch):
    """lirdrec_jax.main, imported in this process. Defining its --config flag loads the default
    config file (relative to the working directory) with ml_collections' loader, which uses
    the deprecated load_module()."""
    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'the load_module', DeprecationWarning)
        from lirdrec_jax import main
    return main


def test_unknown_config_key_is_a_clear_error(monkeypatch):
    main = import_main(monkeypatch)
    monkeypatch.setattr(sys, 'argv', ['lirdrec_jax.main', '--config', 'lirdrec',
                                      '--config.model.knn=5'])
    with pytest.raises(SystemExit) as exit_:
        main.run()  # stops in the check before absl parses the flags
    message = str(exit_.value.code)
    assert message.startswith("error: unknown config key 'model.knn'") and 'knn_k' in message


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    """What `main` makes of a user error: one line naming the missing folder, no traceback."""
    main = import_main(monkeypatch)
    cfg = cli.load_config('configs/lirdrec.py:baby')
    cfg.data.data_dir = str(tmp_path)
    cfg.checkpoint.output_dir = str(tmp_path / 'runs')
    monkeypatch.setattr(main, '_CONFIG', types.SimpleNamespace(value=cfg))
    monkeypatch.delenv('LIRDREC_JAX_TRACEBACK', raising=False)
    with pytest.raises(SystemExit) as exit_:
        main.main(['lirdrec_jax.main'])
    message = str(exit_.value.code)
    assert message.startswith('error: ') and f'{tmp_path / "baby"}' in message
    assert 'does not exist' in message


@pytest.fixture(scope='module')
def full_grid(data_dir, tmp_path_factory):
    """An uninterrupted grid of two points (reg_weight 0.01, 0.001), 3 epochs each:
    (config, summary). Shared, read-only."""
    cfg = grid_config(data_dir, tmp_path_factory.mktemp('full_grid'))
    return cfg, experiment.run(cfg)


def grid_config(data_dir, out_dir):
    cfg = small_config(data_dir, out_dir, epochs=3, stopping_step=5)
    cfg.model.reg_weight = (0.01, 0.001)
    cfg.hyper_parameters = ('model.reg_weight', 'train.seed')
    return cfg


def strip(summary):
    return [(p['values'], p['best_valid'], p['best_test']) for p in summary['points']]


def test_interrupted_grid_resumes_to_the_same_results(data_dir, full_grid, tmp_path,
                                                      training_log):
    _, full = full_grid
    cfg = grid_config(data_dir, tmp_path)
    partial = experiment.run(cfg, stop_after_epochs=2)
    assert not partial['finished']
    assert training_log.groups == [['point-000'], ['point-001']]
    assert training_log.epochs == [(0, 1), (1, 1), (0, 1), (1, 1)]
    training_log.clear()
    cfg.resume = True
    resumed = experiment.run(cfg)
    # Each point trained only its last epoch, from its checkpoint.
    assert training_log.groups == [['point-000'], ['point-001']]
    assert training_log.epochs == [(2, 1), (2, 1)]
    assert resumed['finished']
    assert strip(resumed) == strip(full)
    assert len(full['points']) == 2 and full['best_point'] in (0, 1)
    full_dir = Path(full_grid[0].checkpoint.output_dir) / 'run'
    for point in ('point-000', 'point-001'):
        assert read_npz(tmp_path / 'run' / point / 'test_users.npz') == read_npz(
            full_dir / point / 'test_users.npz')


def read_npz(path):
    with np.load(path) as arrays:
        return {key: arrays[key].tolist() for key in arrays.files}


def test_per_user_test_metrics_of_the_best_epoch_beside_each_result(data_dir, full_grid):
    """Each finished point keeps its test users' own metrics at the best valid epoch: the users
    of the test split, and values whose means are the reported test metrics; results.json names
    the split they belong to."""
    cfg, summary = full_grid
    dataset = experiment.load_dataset(cfg.data)
    run_dir = Path(cfg.checkpoint.output_dir) / 'run'
    assert summary['data'] == data_lib.split_summary(dataset)
    assert json.loads((run_dir / 'results.json').read_text())['data'] == summary['data']
    for point in summary['points']:
        point_dir = run_dir / f'point-{point["index"]:03d}'
        saved = read_npz(point_dir / 'test_users.npz')
        assert saved.pop('users') == np.unique(dataset.test.users).tolist()
        assert saved.pop('epoch') == point['best_epoch']
        assert sorted(saved) == sorted(point['best_test'])
        for key, values in saved.items():
            # Within the 4-decimal rounding of the reported value (a mean that lands on a
            # decimal tie may round either way depending on the order of summation).
            assert abs(np.mean(values) - point['best_test'][key]) <= 5e-5 + 1e-12
        assert sorted(p.name for p in point_dir.glob('test_users*')) == ['test_users.npz']


def test_the_split_hash_tells_splits_apart(data_dir):
    dataset = experiment.load_dataset(small_config(data_dir, data_dir).data)
    moved = dataset.test._replace(items=np.roll(dataset.test.items, 1))
    base, other = (data_lib.split_summary(d) for d in (dataset, dataset._replace(test=moved)))
    assert base == data_lib.split_summary(dataset)
    assert base['split_sha256'] != other['split_sha256']
    assert {k: v for k, v in base.items() if k != 'split_sha256'} == {
        k: v for k, v in other.items() if k != 'split_sha256'}


def test_finished_points_are_not_trained_again_on_resume(data_dir, full_grid, tmp_path,
                                                         training_log, monkeypatch):
    """A run killed during its second point, after the first one finished: the resumed run
    trains the rest of the second point only, and ends with the uninterrupted results."""
    _, full = full_grid
    cfg = grid_config(data_dir, tmp_path)
    counted = train.train_points  # (training_log's wrapper)

    def killed_in_the_second_point(cfgs, data, workdirs, **kwargs):
        if workdirs[0].name == 'point-001':
            counted(cfgs, data, workdirs, **{**kwargs, 'stop_after_epochs': 1})
            raise KeyboardInterrupt
        return counted(cfgs, data, workdirs, **kwargs)

    monkeypatch.setattr(train, 'train_points', killed_in_the_second_point)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(cfg)
    assert training_log.epochs == [(0, 1), (1, 1), (2, 1), (0, 1)]
    first = tmp_path / 'run' / 'point-000'
    assert (first / 'result.json').exists() and not (tmp_path / 'run' / 'point-001' /
                                                     'result.json').exists()
    files_of_first = {p: p.read_bytes() for p in first.rglob('*') if p.is_file()}
    monkeypatch.setattr(train, 'train_points', counted)
    training_log.clear()
    cfg.resume = True
    resumed = experiment.run(cfg)
    assert training_log.groups == [['point-001']]
    assert training_log.epochs == [(1, 1), (2, 1)]
    assert {p: p.read_bytes() for p in first.rglob('*') if p.is_file()} == files_of_first
    assert resumed['finished'] and strip(resumed) == strip(full)


def test_an_existing_run_is_never_overwritten(full_grid):
    cfg, _ = full_grid
    root = Path(cfg.checkpoint.output_dir)
    before = {p: p.stat().st_mtime_ns for p in root.rglob('*')}
    with pytest.raises(FileExistsError, match='already holds a run'):
        experiment.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == before


def test_resume_with_a_different_config_is_refused(full_grid):
    cfg = copy.deepcopy(full_grid[0])
    root = Path(cfg.checkpoint.output_dir)
    before = {p: p.stat().st_mtime_ns for p in root.rglob('*')}
    cfg.resume = True
    cfg.model.knn_k = 3
    with pytest.raises(ValueError, match=r"differs from this one in \['model'\]"):
        experiment.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == before
