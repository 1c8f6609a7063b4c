"""Vmapped sweeps: each point's results equal training it alone; grouping; early stopping per
point; the command-line switch and resume."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from lirdrec_jax import experiment, grid, sweep, train
from tests.test_main import small_config
from tests.test_train import tiny_dataset


@pytest.fixture(scope='module')
def prepared():
    return train.prepare_data(tiny_dataset(), 'lirdrec')


def grid_points(**values):
    cfg = test_config.get_config()
    cfg.train.epochs, cfg.train.stopping_step = 3, 10
    for dotted, v in values.items():
        section, name = dotted.split('__')
        cfg[section][name] = v
    cfg.hyper_parameters = tuple(k.replace('__', '.') for k in values)
    return grid.expand_grid(cfg)


def assert_point_equal(alone, together):
    a = np.array([h['loss'] for h in alone['history']])
    b = np.array([h['loss'] for h in together['history']])
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert [h['valid'] for h in together['history']] == [h['valid'] for h in alone['history']]
    assert [h['test'] for h in together['history']] == [h['test'] for h in alone['history']]
    assert (together['best_epoch'], together['best_valid'], together['best_test']) == \
        (alone['best_epoch'], alone['best_valid'], alone['best_test'])


def test_each_vmapped_point_equals_training_it_alone(prepared, tmp_path, training_log):
    points = grid_points(optim__learning_rate=(0.005, 0.02), model__reg_weight=(0.01, 0.001),
                         model__mm_image_weight=(0.1, 0.6), model__decay_weight=(0.9, 0.5),
                         train__seed=(1, 2))
    points = [points[i] for i in (0, 31, 10, 21)]  # every field takes both values
    assert all(len({str(p.values[k]) for p in points}) == 2 for k in points[0].values)
    assert len(sweep.group_points(points)) == 1
    alone = [train.train_and_evaluate(p.config, prepared, tmp_path / f'a{p.index}')
             for p in points]
    training_log.clear()
    together = sweep.train_group([p.config for p in points], prepared,
                                 [tmp_path / f'v{p.index}' for p in points])
    # One program for the four points: each epoch round trained all of them side by side.
    assert training_log.epochs == [(0, 4), (1, 4), (2, 4)]
    for a, b in zip(alone, together):
        assert_point_equal(a, b)
    # The points really differ from each other.
    assert len({round(r['history'][-1]['loss'], 4) for r in alone}) == len(points)
    # Same files per point as sequential training.
    for p in points:
        lines = (tmp_path / f'v{p.index}' / 'metrics.jsonl').read_text().splitlines()
        assert [json.loads(l)['epoch'] for l in lines] == [0, 1, 2]


def test_early_stopping_per_point_and_compaction(prepared, tmp_path, monkeypatch):
    # Points stop early at different rounds (after 2, 3 and 5 epochs): finished points stop
    # updating, the group shrinks to the last one (compaction) and it goes on.
    # (The group loop is train.train_points: its compaction calls train.take, which sweep.take
    # re-exports.)
    compactions = []
    take = train.take
    monkeypatch.setattr(train, 'take', lambda tree, index, axes=None: (
        compactions.append(np.asarray(index).tolist()) if np.ndim(index) else None,
        take(tree, index, axes))[1])
    cfgs = []
    for epochs, stopping_step, lr in [(5, 0, 1.0), (5, 0, 0.3), (5, 10, 0.01)]:
        cfg = grid_points(optim__learning_rate=(lr,))[0].config
        cfg.train.epochs, cfg.train.stopping_step = epochs, stopping_step
        cfgs.append(cfg)
    assert len(sweep.group_points([grid.GridPoint(i, {}, c) for i, c in enumerate(cfgs)])) == 1
    alone = [train.train_and_evaluate(c, prepared, tmp_path / f'a{i}') for i, c in enumerate(cfgs)]
    together = sweep.train_group(cfgs, prepared, [tmp_path / f'v{i}' for i in range(len(cfgs))])
    assert [r['epochs_done'] for r in alone] == [2, 3, 5]
    assert compactions == [[2]]
    for a, b in zip(alone, together):
        assert b['epochs_done'] == a['epochs_done'] and b['finished']
        assert_point_equal(a, b)


def test_grouping_by_static_fields_and_max_points():
    cfg = test_config.get_config()
    cfg.model.n_ui_layers = (1, 2)
    cfg.model.reg_weight = (0.1, 0.01, 0.001)
    cfg.hyper_parameters = ('model.n_ui_layers', 'model.reg_weight')
    points = grid.expand_grid(cfg)
    groups = sweep.group_points(points)
    assert [[p.index for p in g] for g in groups] == [[0, 1, 2], [3, 4, 5]]
    assert [[p.index for p in g] for g in sweep.group_points(points, max_points=2)] == \
        [[0, 1], [2], [3, 4], [5]]
    # mm_image_weight 0 or 1 gives the kNN graph other entries: its own group.
    cfg.model.n_ui_layers = (2,)
    cfg.model.mm_image_weight = (0.0, 0.5, 0.9)
    cfg.hyper_parameters = ('model.mm_image_weight', 'model.reg_weight')
    groups = sweep.group_points(grid.expand_grid(cfg))
    assert [[p.values['model.mm_image_weight'] for p in g] for g in groups] == \
        [[0.0] * 3, [0.5, 0.5, 0.5, 0.9, 0.9, 0.9]]


def test_stack_or_share():
    a = {'shared': jnp.arange(3), 'own': jnp.zeros(2)}
    b = {'shared': jnp.arange(3), 'own': jnp.ones(2)}
    tree, axes = sweep.stack_or_share([a, b])
    assert axes == {'shared': None, 'own': 0}
    assert tree['shared'].shape == (3,) and tree['own'].shape == (2, 2)


@pytest.fixture(scope='module')
def grid_data(tmp_path_factory):
    from lirdrec_jax import synthetic
    root = tmp_path_factory.mktemp('data')
    synthetic.write_synthetic_dataset(root, 'small', n_users=200, n_items=100, seed=1,
                                      image_dim=32, text_dim=24)
    return root


def two_point_grid(data_dir, out_dir, mode):
    cfg = small_config(data_dir, out_dir, epochs=2, stopping_step=5)
    cfg.model.reg_weight = (0.01, 0.001)
    cfg.hyper_parameters = ('model.reg_weight', 'train.seed')
    cfg.sweep.mode = mode
    return cfg


@pytest.fixture(scope='module')
def uninterrupted_grid(grid_data, tmp_path_factory):
    """The two-point grid trained sequentially without interruption: (summary, losses per
    point)."""
    out = tmp_path_factory.mktemp('sequential')
    summary = experiment.run(two_point_grid(grid_data, out, 'sequential'))
    return summary, point_losses(out)


def point_losses(out_dir):
    return [[json.loads(l)['loss'] for l in (point / 'metrics.jsonl').read_text().splitlines()]
            for point in sorted((out_dir / 'run').glob('point-*'))]


# How each mode trains the two points of the grid: one vmapped group, or one point at a time.
GROUPS = {'vmapped': [['point-000', 'point-001']],
          'sequential': [['point-000'], ['point-001']]}


@pytest.mark.parametrize('interrupted_mode,resumed_mode', [('vmapped', 'sequential'),
                                                           ('sequential', 'vmapped')])
def test_command_line_switch_trains_vmapped_and_resumes_in_either_mode(
        grid_data, uninterrupted_grid, tmp_path, training_log, interrupted_mode, resumed_mode):
    """Interrupted after epoch 0 in one sweep mode, resumed in the other: the resumed run
    trains epoch 1 only, as that mode does, and ends with the uninterrupted results."""
    rounds = lambda mode, epoch: ([(epoch, 2)] if mode == 'vmapped'
                                  else [(epoch, 1), (epoch, 1)])
    cfg = two_point_grid(grid_data, tmp_path, interrupted_mode)
    partial = experiment.run(cfg, stop_after_epochs=1)
    assert not partial['finished']
    assert training_log.groups == GROUPS[interrupted_mode]
    assert training_log.epochs == rounds(interrupted_mode, 0)
    training_log.clear()
    cfg.resume = True
    cfg.sweep.mode = resumed_mode
    resumed = experiment.run(cfg)
    assert training_log.groups == GROUPS[resumed_mode]
    assert training_log.epochs == rounds(resumed_mode, 1)
    full, full_losses = uninterrupted_grid
    strip = lambda s: [(p['values'], p['best_valid'], p['best_test']) for p in s['points']]
    assert resumed['finished'] and strip(resumed) == strip(full)
    losses = point_losses(tmp_path)
    assert [len(l) for l in losses] == [2, 2]
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5)
    assert losses[0] != losses[1]  # the two points differ


def test_bad_sweep_mode_names_the_field():
    cfg = test_config.get_config()
    cfg.sweep.mode = 'parallel'
    with pytest.raises(ValueError, match="sweep.mode = 'parallel'"):
        sweep.check_sweep_config(cfg.sweep)
