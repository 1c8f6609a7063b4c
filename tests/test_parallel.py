"""parallel.py on the one device of the normal test process (the multi-device tests run in
their own processes: test_multidevice.py, test_multiprocess.py)."""
import numpy as np
import pytest

from lirdrec_jax import evaluation, parallel


def test_pad_to_multiple():
    a = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(parallel.pad_to_multiple(a, 1, 4, fill=-1),
                                  [[0, 1, 2, -1], [3, 4, 5, -1]])
    assert parallel.pad_to_multiple(a, 0, 2) is not None
    np.testing.assert_array_equal(parallel.pad_to_multiple(a, 0, 2), a)
    assert parallel.pad_to_multiple(a, 0, 3).shape == (3, 3)


def test_bad_parallel_settings_name_the_field():
    with pytest.raises(ValueError, match='parallel.num_devices = 99'):
        parallel.Partitioner(num_devices=99)
    with pytest.raises(ValueError, match="parallel.distributed = 'maybe'"):
        parallel.initialize_distributed('maybe')


def test_no_distributed_start_without_a_launcher(monkeypatch):
    for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'SLURM_NTASKS',
                'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE', 'TPU_WORKER_HOSTNAMES'):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed('auto') is False
    assert parallel.initialize_distributed('off') is False
    monkeypatch.setenv('SLURM_NTASKS', '4')
    assert parallel._several_processes_from_environment()


def test_one_device_partitioner_ranks_like_a_numpy_argsort():
    rng = np.random.default_rng(2)
    tr_u, tr_i = rng.integers(0, 30, 200), rng.integers(0, 40, 200)
    te_u, te_i = rng.integers(0, 30, 60), rng.integers(0, 40, 60)
    split = evaluation.build_eval_split(te_u, te_i, tr_u, tr_i)
    users = rng.standard_normal((30, 5)).astype(np.float32)
    items = rng.standard_normal((40, 5)).astype(np.float32)
    p = parallel.Partitioner(1)
    assert p.layout_hook() is None  # nothing to pin on one device
    scores = users[split.users].astype(np.float64) @ items.T.astype(np.float64)
    for row, u in enumerate(split.users):
        scores[row, tr_i[tr_u == u]] = -1e10  # the user's training items
    expected = np.argsort(-scores, axis=1, kind='stable')[:, :10]
    got = evaluation.full_sort_topk(users, items, split, k=10, batch_size=7, partitioner=p)
    np.testing.assert_array_equal(got, expected)
    # Without a partitioner: the same single-device path.
    np.testing.assert_array_equal(
        evaluation.full_sort_topk(users, items, split, k=10, batch_size=7), expected)
