"""End to end: the command line on a small synthetic dataset, run directories, resume, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import test as test_config
from lirdrec_jax import synthetic
from lirdrec_jax import experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    synthetic.write_synthetic_dataset(root, 'small', n_users=400, n_items=200, seed=1,
                                      image_dim=64, text_dim=48)
    return root


def run_cli(*args, cwd=REPO):
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    return subprocess.run([sys.executable, '-m', 'lirdrec_jax.main', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_command_line_trains_and_beats_most_popular(data_dir, tmp_path):
    out = run_cli('--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
                  '--config.data.dataset=small', f'--config.checkpoint.output_dir={tmp_path}',
                  '--config.train.epochs=8', '--config.train.stopping_step=8')
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(l.startswith('epoch ') for l in lines) == 8  # one progress line per epoch
    row = lambda label: [float(x) for x in next(l for l in lines if l.startswith(label)).split()[-4:]]
    model, popular = row('lirdrec test recall'), row('most-popular test recall')
    assert model[2] > 1.2 * popular[2], (model, popular)  # Recall@20
    run_dir = next(tmp_path.glob('lirdrec-small-*'))
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['finished'] and results['points'][0]['best_test']['recall@20'] == model[2]
    assert (run_dir / 'point-000' / 'metrics.jsonl').read_text().count('\n') == 8


def test_unknown_config_key_is_a_clear_error():
    out = run_cli('--config', 'configs/lirdrec.py', '--config.model.knn=5')
    assert out.returncode != 0
    assert "unknown config key 'model.knn'" in out.stderr and 'knn_k' in out.stderr
    assert 'Traceback' not in out.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    out = run_cli('--config', 'configs/lirdrec.py:baby', f'--config.data_dir={tmp_path}',
                  f'--config.checkpoint.output_dir={tmp_path / "runs"}')
    assert out.returncode != 0
    assert f'{tmp_path / "baby"}' in out.stderr and 'does not exist' in out.stderr
    assert 'Traceback' not in out.stderr and out.stderr.startswith('error: ')


def small_config(data_dir, out_dir, **train):
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(data_dir), 'small'
    cfg.checkpoint.output_dir = str(out_dir)
    cfg.checkpoint.run_name = 'run'
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def test_interrupted_grid_resumes_to_the_same_results(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path / 'a', epochs=3, stopping_step=5)
    cfg.model.reg_weight = (0.01, 0.001)
    cfg.hyper_parameters = ('model.reg_weight', 'train.seed')
    full = experiment.run(cfg)
    cfg.checkpoint.output_dir = str(tmp_path / 'b')
    partial = experiment.run(cfg, stop_after_epochs=2)
    assert not partial['finished']
    cfg.resume = True
    resumed = experiment.run(cfg)
    assert resumed['finished']
    strip = lambda s: [(p['values'], p['best_valid'], p['best_test']) for p in s['points']]
    assert strip(resumed) == strip(full)
    assert len(full['points']) == 2 and full['best_point'] in (0, 1)


def test_an_existing_run_is_never_overwritten(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, epochs=1)
    experiment.run(cfg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    with pytest.raises(FileExistsError, match='already holds a run'):
        experiment.run(cfg)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before


def test_resume_with_a_different_config_is_refused(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, epochs=1)
    experiment.run(cfg)
    cfg.resume = True
    cfg.model.knn_k = 3
    with pytest.raises(ValueError, match=r"differs from this one in \['model'\]"):
        experiment.run(cfg)
