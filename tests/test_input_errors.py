"""Bad command-line and config input: one `error:` line (or a ValueError that main turns into
one) naming the variant or field and what was expected."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lirdrec_jax import cli, evaluation, grid, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'


@pytest.mark.parametrize('model', ['lirdrec', 'freedom'])
def test_unknown_variant_is_one_error_line_listing_the_valid_ones(model):
    # precheck is what both `lirdrec_jax.main` and `lirdrec_jax.parity` run before absl.
    with pytest.raises(SystemExit) as exit_info:
        cli.precheck(['prog', '--config', f'{CONFIGS / model}.py:nosuch'])
    message = str(exit_info.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    assert "'nosuch'" in message
    for variant in ('synthetic', 'baby', 'sports', 'clothing', 'elec', 'microlens'):
        assert variant in message, message
    if model == 'lirdrec':  # the only config with the CPU speed modifier
        assert '",fast"' in message, message


def test_unknown_variant_on_the_command_line_prints_only_the_error_line():
    env = {k: v for k, v in os.environ.items() if k != 'LIRDREC_JAX_TRACEBACK'}
    env['PYTHONPATH'] = str(REPO)
    out = subprocess.run([sys.executable, '-m', 'lirdrec_jax.main', '--config',
                          'configs/lirdrec.py:nosuch'], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == ''
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
    assert "'nosuch'" in lines[0] and 'synthetic, baby' in lines[0]


@pytest.mark.parametrize('args, expected', [
    ([], "error: --reference PATH (a clone of enoche/FREEDOM) is required"),
    (['--reference', '/nowhere', 'extra'], "error: unexpected arguments ['extra']"),
    (['--reference', '/nowhere', '--point', '99'],
     'error: --point 99: the config has 1 grid points (0 to 0)'),
])
def test_parity_command_mistakes_are_one_error_line(args, expected):
    env = {k: v for k, v in os.environ.items() if k != 'LIRDREC_JAX_TRACEBACK'}
    env['PYTHONPATH'] = str(REPO)
    out = subprocess.run([sys.executable, '-m', 'lirdrec_jax.parity', '--config', 'freedom',
                          *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert lines[0].startswith(expected), lines[0]


def test_topk_beyond_item_count_names_the_field_and_item_count():
    # The most-popular baseline ranks before any model trains: its guard must name the field.
    split = evaluation.build_eval_split(np.array([0]), np.array([1]), np.array([0]),
                                        np.array([2]))
    with pytest.raises(ValueError, match=r'eval\.topk.*50.*n_items=3'):
        evaluation.evaluate_popularity(np.array([2]), 3, split, ks=(5, 50))


@pytest.mark.parametrize('model', ['lirdrec', 'freedom'])
@pytest.mark.parametrize('learning_rate', [0.0, -0.001])
def test_non_positive_learning_rate_is_rejected_at_its_grid_point(model, learning_rate):
    config = cli.load_config(f'{CONFIGS / model}.py')
    config.optim.learning_rate = (0.001, learning_rate)
    config.hyper_parameters = ('optim.learning_rate', 'train.seed')
    good, bad = grid.expand_grid(config)
    train.check_point_config(good.config, 200, 100)
    with pytest.raises(ValueError, match=rf'optim\.learning_rate = {learning_rate}; '
                                         rf'expected > 0'):
        train.check_point_config(bad.config, 200, 100)
