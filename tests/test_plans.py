"""Memory plans and the cost model (lirdrec_jax.plans): the plan of a tiny case against the
arrays' own sizes, bfloat16 features, fit verdicts and advice against made-up devices, the
roofline, and XLA's FLOP count of a step against the analytic one."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lirdrec_jax import bench, cli, grid, lowering, models, parallel, plans, train

N_USERS, N_ITEMS, N_INTER = 60, 40, 500
IMAGE_DIM, TEXT_DIM = 24, 12


def small_point(name: str, dtype: str = 'float32', text_dim: int = TEXT_DIM):
    """The model's first grid point with 8-d widths, batch 36, evaluation blocks of 16 users."""
    cfg = grid.expand_grid(cli.load_config(name))[0].config
    for width in ('embedding_size', 'feat_embed_dim'):
        if width in cfg.model:
            cfg.model[width] = 8
    cfg.model.matmul_dtype = dtype
    cfg.train.batch_size = 36
    cfg.eval.topk, cfg.eval.valid_metric, cfg.eval.batch_size = (5, 10), 'recall@10', 16
    return cfg


@functools.lru_cache(maxsize=None)
def small_data(name: str, text_dim: int = TEXT_DIM) -> train.PreparedData:
    model = models.get_model(name)
    dataset = bench.synthetic_dataset(N_USERS, N_ITEMS, N_INTER, image_dim=IMAGE_DIM,
                                      text_dim=text_dim, name='tiny',
                                      input_files=model.input_files)
    return train.prepare_data(dataset, name)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


@pytest.fixture(scope='module')
def mllmrec_cells():
    """{dtype: (cell, programs)} of MLLMRec on one device."""
    out = {}
    for dtype in ('float32', 'bfloat16'):
        point = small_point('mllmrec', dtype)
        data = small_data('mllmrec')
        progs = lowering.programs(point, data, parallel.Partitioner(1), platform='gpu')
        out[dtype] = plans.measure_cell(point, data, 1), progs
    return out


def test_resident_bytes_are_the_state_and_frozen_inputs(mllmrec_cells):
    cell, _ = mllmrec_cells['float32']
    # An independent count: the point set up for real (arrays, not shapes).
    setup = train.setup_point(small_point('mllmrec'), small_data('mllmrec'),
                              parallel.Partitioner(1))
    assert cell['resident'] == nbytes(setup.state) + nbytes(setup.frozen)
    # MLLMRec's frozen inputs: e (n_items, F) and P (n_users, F), F = the text width.
    assert nbytes(setup.frozen) == 4 * (N_ITEMS + N_USERS) * TEXT_DIM


def test_training_is_resident_plus_the_epoch_program(mllmrec_cells):
    cell, progs = mllmrec_cells['float32']
    s = cell['stats']['train_epoch']
    args = progs['train_epoch'].args
    # Not resident: the epoch's batches, (n_batches, b = 36) each of users, positives,
    # negatives (int32) and row weights (float32), the scalars and the key.
    n_batches = -(-int(small_data('mllmrec').dataset.train.users.size) // 36)
    assert cell['n_batches'] == n_batches
    assert nbytes(args[1]) == n_batches * 36 * 4 * 4
    outside = nbytes(args[1]) + nbytes(args[4]) + nbytes(args[5]) + nbytes(args[7])
    assert cell['extra']['train_epoch'] == (outside + s['output_bytes'] + s['temp_bytes']
                                            - s['alias_bytes'])
    assert s['alias_bytes'] > 0  # the donated state
    assert cell['training'] == cell['resident'] + max(
        cell['extra'][n] for n in ('train_epoch', 'start_epoch', 'train_step'))
    assert cell['evaluation'] == cell['resident'] + max(
        cell['extra'][n] for n in ('eval_embeddings', 'eval_item_order', 'eval_topk'))
    assert cell['need'] == max(cell['training'], cell['evaluation'])
    # The ranking of one block holds the float32 embeddings of all users and items.
    users, items = jax.eval_shape(progs['eval_embeddings'].fn, *progs['eval_embeddings'].args)
    assert cell['extra']['eval_topk'] >= 4 * (N_USERS + N_ITEMS) * users.shape[1]


def test_bfloat16_frozen_features_halve_their_bytes(mllmrec_cells):
    f32, bf16 = mllmrec_cells['float32'][0], mllmrec_cells['bfloat16'][0]
    # The parameters and Adam's moments stay float32: only e and P change.
    assert f32['resident'] - bf16['resident'] == 2 * (N_ITEMS + N_USERS) * TEXT_DIM


def test_items_split_over_devices_count_one_shard():
    mesh = parallel.Partitioner(1)
    x = jax.ShapeDtypeStruct((40, 24), jnp.float32, sharding=mesh.sharding(0, 2))
    assert plans.device_bytes(x) == 40 * 24 * 4
    # A sharding over 8 devices of a (40, 24) array: 5 rows per device.
    eight = type('Eight', (), {'shard_shape': lambda self, shape: (shape[0] // 8,) + shape[1:]})()
    y = type('Split', (), {'shape': (40, 24), 'dtype': jnp.bfloat16, 'sharding': eight})()
    assert plans.device_bytes(y) == 5 * 24 * 2
    # A leaf given twice counts once.
    z = np.zeros((3, 4), np.float32)
    assert plans.tree_device_bytes([z, z, np.ones(2, np.int32)]) == 48 + 8


def cell(dtype, devices, need, variant='', model='m', scale='s'):
    return {'model': model, 'scale': scale, 'dtype': dtype, 'devices': devices,
            'variant': variant, 'need': need}


def test_fit_leaves_ten_percent_headroom():
    assert plans.fits(90, 100) and not plans.fits(91, 100)
    assert plans.fits(100, 100, headroom=0.0)


def test_advice_comes_from_measured_cells():
    cells = [cell('float32', 1, 120), cell('bfloat16', 1, 80), cell('float32', 8, 60),
             cell('bfloat16', 8, 40), cell('float32', 1, 85, 'eval.batch_size=128'),
             cell('float32', 1, 200, model='other')]
    f32 = cells[0]
    # A device of 100: fits at <= 90. bfloat16 (80), 8 devices (60), the smaller eval batch (85).
    assert plans.advice(f32, cells, 100) == ['bfloat16', 'items split over 8 devices',
                                              'eval.batch_size=128']
    # A device of 70 (<= 63): only the items split over 8 devices.
    assert plans.advice(f32, cells, 70) == ['items split over 8 devices']
    # A device of 50 (<= 45): only both together.
    assert plans.advice(f32, cells, 50) == ['bfloat16 + items split over 8 devices']
    # A device of 40 (<= 36): nothing measured fits; another model's cells never count.
    assert plans.advice(f32, cells, 40) == []
    assert plans.advice(f32, cells, 200) == []  # it fits: no advice
    v = plans.verdicts(f32, cells, [plans.Device('small', 100, 1.0, 1.0, 1.0),
                                    plans.Device('big', 1000, 1.0, 1.0, 1.0)])
    assert v == {'small': {'fits': False, 'advice': ['bfloat16', 'items split over 8 devices',
                                                     'eval.batch_size=128']},
                 'big': {'fits': True, 'advice': []}}


def test_roofline_is_the_slower_of_compute_and_memory():
    assert plans.roofline_seconds(2e12, 1e9, 1e12, 1e12) == 2.0  # compute-bound
    assert plans.roofline_seconds(1e9, 3e12, 1e12, 1e12) == 3.0  # memory-bound
    c = {'model': 'm', 'scale': 's', 'n_batches': 10, 'analytic_flops': 4e12,
         'stats': {'train_step': {'flops': 5e12, 'bytes_accessed': 2e11}}}
    b = {'n_batches': 10, 'stats': {'train_step': {'flops': 5e12, 'bytes_accessed': 1e11}}}
    dev = plans.Device('d', 1, 1e12, 4e12, 1e11)
    row = plans.cost_row(c, b, [dev])
    assert row['ratio'] == 1.25
    # float32: 10 x max(4, 2) s; bfloat16: 10 x max(1, 1) s.
    assert row['epoch_seconds'] == {'d': {'float32': 40.0, 'bfloat16': 10.0}}


def test_xla_counts_mllmrecs_analytic_flops():
    """MLLMRec's step is its towers' matmuls; with 256-d inputs the elementwise work (Adam,
    activations, the loss) is a few percent of it. By hand, 8-d towers (hidden 32), batch 36:
    per row of width 256 forward 2 (256 * 32 + 32 * 8), the kernels' gradients as much, the
    hidden layer's input gradient 2 * 32 * 8; 2 x 36 item rows and 36 user rows."""
    point = small_point('mllmrec', text_dim=256)
    data = small_data('mllmrec', 256)
    measured = plans.measure_cell(point, data, 1)
    per_row = 2 * 2 * (256 * 32 + 32 * 8) + 2 * 32 * 8
    hand = 3 * 36 * per_row
    size = bench.problem_size(point, data.dataset)
    assert size.feature_dims == (IMAGE_DIM, 256) and size.batch_size == 36
    assert models.get_model('mllmrec').flops_per_batch(point.model, size) == hand
    ratio = measured['stats']['train_step']['flops'] / hand
    assert 1.0 <= ratio < 1.1, ratio


@pytest.mark.parametrize('argv, message', [
    (['--models', 'lirdrec,nope'], "--models 'lirdrec,nope': expected a comma-separated list"),
    (['--scales', 'huge'], "--scales 'huge'"),
    (['--dtypes', 'float16'], "--dtypes 'float16'"),
    (['--devices', '0'], "--devices '0'"),
])
def test_command_rejects_bad_lists(argv, message):
    with pytest.raises(SystemExit, match=re.escape('error: ' + message)):
        plans.main(argv)


def test_report_tables_name_every_cell():
    cells = [dict(cell('float32', 1, 20 * plans.GiB, model='lirdrec', scale='elec'),
                  resident=plans.GiB, training=20 * plans.GiB, evaluation=2 * plans.GiB),
             dict(cell('bfloat16', 1, 6 * plans.GiB, model='lirdrec', scale='elec'),
                  resident=plans.GiB, training=6 * plans.GiB, evaluation=2 * plans.GiB)]
    report = plans.plan_report(cells)
    text = plans.format_report(report)
    assert '| lirdrec | elec | float32 | 1 | 1.000 | 20.000 | 2.000 | A40 A80 |' in text
    assert '| lirdrec | elec | bfloat16 | 1 | 1.000 | 6.000 | 2.000 | v2 v5e T4 A40 A80 |' in text
    assert '| lirdrec | elec | float32 | 1 | 20.000 | T4 | bfloat16 |' in text
