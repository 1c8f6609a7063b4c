"""Several host devices give the numbers of one device: training (batch split over devices,
items split over devices, batch sizes not divisible by the device count), scanned epochs,
evaluation (users split over devices), vmapped sweeps, `parallel.num_devices`; and the compiled
step really splits the towers' work by item. The one-device baseline is trained once per
process (the `one_device` fixture)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lirdrec_jax import bench, evaluation, parallel, sampling, sweep, train
from tests.test_train import point_config, tiny_dataset

N_DEV = jax.device_count()


@pytest.fixture(scope='module')
def prepared():
    return train.prepare_data(tiny_dataset(), 'lirdrec')


def assert_same_training(one, many, rtol=1e-5):
    losses_1 = np.array([h['loss'] for h in one['history']])
    losses_n = np.array([h['loss'] for h in many['history']])
    np.testing.assert_allclose(losses_n, losses_1, rtol=rtol)
    assert [h['valid'] for h in many['history']] == [h['valid'] for h in one['history']]
    assert [h['test'] for h in many['history']] == [h['test'] for h in one['history']]


def run(cfg, prepared, tmp_path, name, partitioner):
    return train.train_and_evaluate(cfg, prepared, tmp_path / name, partitioner=partitioner)


def baseline_config():
    # 70 rows per batch and 70 items: neither divides by 4 or 8, so batches and items are
    # padded (zero-weight rows, zero feature rows).
    return point_config(epochs=3, stopping_step=10, batch_size=70)


@pytest.fixture(scope='module')
def one_device(prepared, tmp_path_factory):
    """The baseline every multi-device run is compared with: one device, 3 epochs."""
    result = run(baseline_config(), prepared, tmp_path_factory.mktemp('one'), 'run',
                 parallel.Partitioner(1))
    assert len({round(h['loss'], 5) for h in result['history']}) == 3  # it did train
    return result


def test_the_process_sees_several_devices():
    assert N_DEV >= 4, 'XLA_FLAGS=--xla_force_host_platform_device_count was not applied'


@pytest.mark.parametrize('shard_items', [True, False])
def test_data_parallel_training_equals_one_device(prepared, one_device, tmp_path, shard_items):
    cfg = baseline_config()
    assert cfg.train.batch_size % N_DEV and prepared.dataset.n_items % N_DEV
    many = run(cfg, prepared, tmp_path, 'many', parallel.Partitioner(N_DEV, shard_items))
    assert_same_training(one_device, many)


def test_num_devices_limits_the_devices_a_run_uses(prepared, one_device, tmp_path, monkeypatch):
    """`parallel.num_devices = 1` (no partitioner given) on a process with several devices:
    the training state lives on the first device only, with the numbers of one device."""
    num_devices = 1
    devices_of_state = []
    run_epoch = train.run_epoch

    def recording(fns, state, *args, **kwargs):
        devices_of_state.append({d for x in jax.tree.leaves(state) for d in x.sharding.device_set})
        return run_epoch(fns, state, *args, **kwargs)

    monkeypatch.setattr(train, 'run_epoch', recording)
    cfg = baseline_config()
    cfg.parallel.num_devices = num_devices
    result = train.train_and_evaluate(cfg, prepared, tmp_path)
    assert [len(d) for d in devices_of_state] == [num_devices] * 3
    assert devices_of_state[0] == set(jax.devices()[:num_devices])
    assert_same_training(one_device, result)


def test_per_batch_dispatch_and_edge_dropout_on_several_devices(prepared, tmp_path):
    cfg = point_config(epochs=2, stopping_step=10, batch_size=70)
    cfg.model.dropout = 0.2
    one = run(cfg, prepared, tmp_path, 'one', parallel.Partitioner(1))  # scanned epochs
    cfg.train.scan_epoch = False
    many = run(cfg, prepared, tmp_path, 'many', parallel.Partitioner(N_DEV))
    assert_same_training(one, many)


def test_evaluation_on_several_devices_is_identical(prepared):
    rng = np.random.default_rng(0)
    ds = prepared.dataset
    users = rng.standard_normal((ds.n_users, 8)).astype(np.float32)
    items = rng.standard_normal((ds.n_items, 8)).astype(np.float32)
    split = prepared.test
    assert split.n_eval % (7 * N_DEV)  # the last group of batches is partly dummy
    one = evaluation.full_sort_topk(users, items, split, k=20, batch_size=7)
    many = evaluation.full_sort_topk(users, items, split, k=20, batch_size=7,
                                     partitioner=parallel.Partitioner(N_DEV))
    np.testing.assert_array_equal(many, one)
    assert evaluation.evaluate_full_sort(users, items, split, batch_size=7) == \
        evaluation.evaluate_full_sort(users, items, split, batch_size=7,
                                      partitioner=parallel.Partitioner(N_DEV))


def test_vmapped_sweep_on_several_devices_equals_points_alone(prepared, one_device, tmp_path):
    other = baseline_config()
    other.train.seed, other.model.reg_weight = 2, 0.01
    alone = [one_device, run(other, prepared, tmp_path, 'alone', parallel.Partitioner(1))]
    together = sweep.train_group([baseline_config(), other], prepared,
                                 [tmp_path / 'v0', tmp_path / 'v1'],
                                 partitioner=parallel.Partitioner(N_DEV))
    for a, b in zip(alone, together):
        assert_same_training(a, b)
    assert alone[0]['history'][0]['loss'] != alone[1]['history'][0]['loss']


def test_bfloat16_towers_run_on_several_devices(prepared, one_device, tmp_path):
    cfg = baseline_config()
    cfg.model.matmul_dtype = 'bfloat16'
    bf16 = run(cfg, prepared, tmp_path, 'bf16', parallel.Partitioner(N_DEV))
    losses = [h['loss'] for h in bf16['history']]
    np.testing.assert_allclose(losses, [h['loss'] for h in one_device['history']], rtol=2e-2)
    assert losses != [h['loss'] for h in one_device['history']]  # bfloat16 really is in use


def test_compiled_step_splits_the_towers_by_item():
    """Each device multiplies only its share of the items, and the towers' weight gradients are
    summed across devices; the features are never gathered whole."""
    prepared = train.prepare_data(bench.synthetic_dataset(200, 302, 1500, image_dim=256,
                                                          text_dim=32), 'lirdrec')
    cfg = point_config()
    p = parallel.Partitioner(N_DEV)
    ds = prepared.dataset
    setup = train.setup_point(cfg, prepared, p)
    batches = sampling.epoch_batches(sampling.epoch_rng(0, 0), prepared.sampler, 64)
    batch = sampling.EpochBatches(*(a[0] for a in train.place_batches(p, batches)))
    step = train.make_epoch_fns(setup, p, 'last_batch').step
    scalars = p.replicate(train.device_scalars({'w1': 0.9, 'w2': 0.1, 'learning_rate': 1e-3,
                                                'reg_weight': 1e-3}))
    hlo = step.lower(setup.state, batch, setup.frozen, None, scalars,
                     p.replicate(setup.epoch_key), jnp.int32(0), None).compile().as_text()
    per_device = p.padded_count(ds.n_items) // N_DEV
    d_image = prepared.model.features.image.shape[1]
    hidden = 4 * int(cfg.model.embedding_size)
    # Forward of the image tower's first layer on this device's items only.
    assert re.search(rf'f32\[{per_device},{hidden}\]\S* dot\(', hlo)
    assert not re.search(rf'f32\[{p.padded_count(ds.n_items)},{hidden}\]\S* dot\(', hlo)
    # Its weight gradient: a partial product per device, then summed over devices (XLA may
    # compute it transposed).
    all_reduces = ' '.join(l for l in hlo.splitlines() if 'all-reduce(' in l)
    assert (f'f32[{d_image},{hidden}]' in all_reduces
            or f'f32[{hidden},{d_image}]' in all_reduces), all_reduces[:2000]
    gathers = ' '.join(l.split('=')[1] for l in hlo.splitlines() if 'all-gather(' in l)
    assert f'[{p.padded_count(ds.n_items)},{d_image}]' not in gathers
