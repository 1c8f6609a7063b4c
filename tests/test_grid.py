"""Grid expansion and config checks."""
import pytest

from configs import lirdrec as lirdrec_config
from lirdrec_jax import cli, grid


def test_baby_grid_is_the_reference_product_without_weight_decay():
    points = grid.expand_grid(lirdrec_config.get_config('baby'))
    assert len(points) == 3 * 2 * 3 * 1 * 3 * 1
    first, last = points[0], points[-1]
    assert first.values == {'model.n_ui_layers': 2, 'model.mm_image_weight': 0.1,
                            'model.reg_weight': 0.01, 'optim.learning_rate': 0.0001,
                            'model.decay_weight': 0.9, 'train.seed': 999}
    assert last.values['model.n_ui_layers'] == 4 and last.values['model.decay_weight'] == 0.99
    assert first.config.model.n_ui_layers == 2 and isinstance(first.config.train.seed, int)
    assert first.config.optim.weight_decay == 0.0


def test_single_point_override_and_default_variant():
    cfg = lirdrec_config.get_config('baby')
    cfg.model.n_ui_layers = (3,)
    cfg.model.mm_image_weight = (0.2,)
    cfg.model.reg_weight = (0.001,)
    cfg.model.decay_weight = (0.95,)
    points = grid.expand_grid(cfg)
    assert len(points) == 1 and points[0].config.model.n_ui_layers == 3
    assert len(grid.expand_grid(lirdrec_config.get_config())) == 1


def test_multi_valued_field_outside_hyper_parameters_is_an_error():
    cfg = lirdrec_config.get_config('synthetic')
    cfg.model.reg_weight = (0.1, 0.01)
    with pytest.raises(ValueError, match='model.reg_weight holds several values'):
        grid.expand_grid(cfg)


def test_unknown_hyper_parameter_is_an_error():
    cfg = lirdrec_config.get_config('synthetic')
    cfg.hyper_parameters = ('model.nope',)
    with pytest.raises(ValueError, match="names 'model.nope', which is not a config field"):
        grid.expand_grid(cfg)


def test_unknown_override_key_names_the_key_and_the_known_fields():
    cfg = lirdrec_config.get_config('baby')
    cli.check_override_keys(cfg, ['prog', '--config.model.knn_k=5', '--config.resume=True'])
    with pytest.raises(cli.ConfigKeyError, match=r"unknown config key 'model.knn' .*knn_k"):
        cli.check_override_keys(cfg, ['prog', '--config.model.knn=5'])
    with pytest.raises(cli.ConfigKeyError, match="top level has no field 'modle'"):
        cli.check_override_keys(cfg, ['prog', '--config.modle.knn_k=5'])


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown config variant 'babby'"):
        lirdrec_config.get_config('babby')


def test_data_dir_shorthand_is_rewritten():
    argv = ['prog', '--config=configs/lirdrec.py:baby', '--config.data_dir=/data/mmrec',
            '--config.model.knn_k=5']
    assert cli.apply_aliases(argv) == ['prog', '--config=configs/lirdrec.py:baby',
                                       '--config.data.data_dir=/data/mmrec',
                                       '--config.model.knn_k=5']
    cli.check_override_keys(lirdrec_config.get_config('baby'), cli.apply_aliases(argv))


def test_fast_variant_sets_the_cpu_speed_options_only():
    base, fast = lirdrec_config.get_config('baby'), lirdrec_config.get_config('baby,fast')
    assert (fast.graph.spmm_impl, fast.model.transposed_features, fast.model.cpu_dot) == \
        ('segment_sum', True, 'eigen')
    assert (base.graph.spmm_impl, base.model.transposed_features, base.model.cpu_dot) == \
        ('bcoo', False, 'xla')
    for cfg in (base, fast):  # everything else is the same
        cfg.graph.spmm_impl, cfg.model.transposed_features, cfg.model.cpu_dot = '', False, ''
    assert base.to_dict() == fast.to_dict()
    assert lirdrec_config.get_config('fast').data.dataset == 'synthetic'
    with pytest.raises(ValueError, match='expected one dataset'):
        lirdrec_config.get_config('baby,sports')
