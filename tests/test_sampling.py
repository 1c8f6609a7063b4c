"""BPR triples: shuffling, padding, and the rejection rule for negatives."""
import numpy as np
import pytest

from lirdrec_jax import sampling


def tables(seed=0, n_users=40, n_items=30, n=500):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items - 5, n)  # last 5 never trained
    return sampling.sampler_tables(users, items, n_items), users, items


def test_epoch_is_a_padded_permutation_of_the_training_rows():
    tab, users, items = tables()
    b = sampling.epoch_batches(np.random.default_rng(1), tab, 64)
    assert b.users.shape == (8, 64)  # ceil(500 / 64)
    real = b.weights.ravel() == 1
    assert real.sum() == 500 and not real[500:].any()
    got = sorted(zip(b.users.ravel()[real], b.positives.ravel()[real]))
    assert got == sorted(zip(users, items))


def test_negatives_are_unseen_and_from_the_training_item_pool():
    tab, users, items = tables()
    seen = set(zip(users.tolist(), items.tolist()))
    b = sampling.epoch_batches(np.random.default_rng(2), tab, 100)
    for u, n in zip(b.users.ravel(), b.negatives.ravel()):
        assert (u, n) not in seen
        assert n in set(items.tolist())  # items never trained (25..29) are never drawn


def test_negatives_are_uniform_over_allowed_items():
    # One user who has seen items 0 and 1 out of a pool of {0..4}: negatives uniform on {2,3,4}.
    tab = sampling.sampler_tables(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 2, 3, 4]), 5)
    neg = sampling.sample_negatives(np.random.default_rng(3), tab, np.zeros(30000, np.int32))
    counts = np.bincount(neg, minlength=5)
    assert counts[0] == counts[1] == 0
    np.testing.assert_allclose(counts[2:] / 30000, [1 / 3] * 3, atol=0.015)


def test_user_who_saw_every_item_is_a_clear_error():
    tab = sampling.sampler_tables(np.array([0, 0, 1]), np.array([0, 1, 0]), 2)
    with pytest.raises(ValueError, match=r'users \[0\]'):
        sampling.sample_negatives(np.random.default_rng(0), tab, np.array([0, 1]), max_rounds=20)


def test_epoch_rng_depends_on_seed_and_epoch_only():
    a = sampling.epoch_rng(7, 3).integers(0, 1 << 30, 4)
    b = sampling.epoch_rng(7, 3).integers(0, 1 << 30, 4)
    c = sampling.epoch_rng(7, 4).integers(0, 1 << 30, 4)
    assert (a == b).all() and (a != c).any()


def test_user_rows_cover_every_user_once_with_zero_weight_padding():
    kind = sampling.batch_kind('user_rows')

    class Dataset:
        n_users = 10

    tables = kind.tables(Dataset())
    b = kind.draw(np.random.default_rng(5), tables, 4)
    assert b.users.shape == b.weights.shape == (3, 4)  # ceil(10 / 4)
    np.testing.assert_array_equal(b.weights.ravel(), [1.0] * 10 + [0.0] * 2)
    np.testing.assert_array_equal(np.sort(b.users.ravel()[:10]), np.arange(10))
    assert (b.users.ravel()[10:] == b.users.ravel()[0]).all()  # padding repeats the first user
    again = kind.draw(np.random.default_rng(5), tables, 4)
    other = kind.draw(np.random.default_rng(6), tables, 4)
    assert (again.users == b.users).all() and (other.users != b.users).any()
    exact = kind.draw(np.random.default_rng(5), tables, 5)  # no padding needed
    assert exact.users.shape == (2, 5) and exact.weights.all()
