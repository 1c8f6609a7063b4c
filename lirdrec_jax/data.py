"""Loading and validating MMRec-layout datasets.

`load_mmrec` converts `<data_dir>/<name>/` once into a cached `.npz` (see
`lirdrec_jax.mmrec_files`, which holds the parsing and validation) and reads that cache on
later runs. When the cache cannot be written (read-only folder, disk full), it warns and goes on
from the converted arrays in memory: the cache only saves time.
"""
import hashlib
import types
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import numpy as np

from lirdrec_jax import mmrec_files, progress
# DataError is defined next to the parsing that raises most of them; it is part of this
# module's interface too (`from lirdrec_jax.data import DataError`).
from lirdrec_jax.mmrec_files import DataError


class Interactions(NamedTuple):
    """One split of user-item interactions, in the order of the `.inter` file.

    Attributes:
      users: (n,) int32 user ids in [0, n_users).
      items: (n,) int32 item ids in [0, n_items).
    """
    users: np.ndarray
    items: np.ndarray


class MMRecDataset(NamedTuple):
    """A dataset in memory, as training reads it.

    Attributes:
      name: dataset name (the `.inter` file stem).
      n_users: max user id over all rows of the `.inter` file + 1 (the reference's count).
      n_items: max item id over all rows + 1.
      train: x_label == 0 rows.
      valid: x_label == 1 rows whose user appears in train (the reference drops the others).
      test: x_label == 2 rows whose user appears in train.
      image_feat: (n_items, d_v) float32 or None when `image_feat.npy` is absent.
      text_feat: (n_items, d_t) float32 or None when `text_feat.npy` is absent.
      extra: the model's extra input files (`base.Model.input_files`), config field name ->
        (n_items or n_users, d) float32 ndarray ('dense' files) or scipy CSR matrix ('sparse'
        files), as `experiment.load_dataset` read them; empty (a read-only mapping) for models
        that declare none.
    """
    name: str
    n_users: int
    n_items: int
    train: Interactions
    valid: Interactions
    test: Interactions
    image_feat: Optional[np.ndarray]
    text_feat: Optional[np.ndarray]
    extra: Mapping[str, np.ndarray] = types.MappingProxyType({})


def _cache_location(dataset_dir: Path, name: str, cache_dir) -> Path:
    """`<cache_dir>/<name>.npz`, or the converter's default next to the source files."""
    if cache_dir:
        return Path(cache_dir) / f'{name}.npz'
    return mmrec_files.default_cache_path(dataset_dir, name)


def _checked_ids(z, key: str, n: int, cache: Path) -> np.ndarray:
    """(m,) int32 ids of one cache field, checked to lie in [0, n)."""
    ids = np.asarray(z[key])
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f'{cache}: field {key} has shape {ids.shape} and dtype {ids.dtype}; '
                        f'expected a 1-D integer array (delete the cache to rebuild it)')
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise DataError(f'{cache}: field {key} holds ids in [{int(ids.min())}, {int(ids.max())}]; '
                        f'expected ids in [0, {n}) (delete the cache to rebuild it)')
    return ids.astype(np.int32, copy=False)


def _checked_features(z, key: str, n_items: int, cache: Path) -> Optional[np.ndarray]:
    """(n_items, d) float32 features of one cache field, or None when absent."""
    if key not in z:
        return None
    feat = np.asarray(z[key])
    if feat.ndim != 2 or feat.shape[0] != n_items:
        raise DataError(f'{cache}: field {key} has shape {feat.shape}; expected '
                        f'(n_items={n_items}, d) (delete the cache to rebuild it)')
    return feat.astype(np.float32, copy=False)


def read_cache(cache: Path, name: str) -> MMRecDataset:
    """Reads a converted `.npz` and re-checks its shapes and id ranges (cheap, O(size)).

    Args:
      cache: the `.npz` written by `mmrec_files.convert_mmrec`.
      name: the dataset name to record.

    Returns:
      The dataset.
    """
    try:
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f'{cache}: cannot be read as a .npz cache ({type(e).__name__}: {e}); '
                        f'delete it to rebuild it') from e
    return dataset_from_arrays(arrays, name, cache)


def dataset_from_arrays(z: dict, name: str, cache: Path) -> MMRecDataset:
    """The dataset held by the cache's arrays (`mmrec_files.convert_arrays`), checked as
    `read_cache` checks them; `cache` names them in messages."""
    missing = [k for k in ('n_users', 'n_items', 'train_users', 'train_items', 'valid_users',
                           'valid_items', 'test_users', 'test_items') if k not in z]
    if missing:
        raise DataError(f'{cache}: missing field(s) {missing}; found {sorted(z)} '
                        f'(delete the cache to rebuild it)')
    n_users, n_items = int(z['n_users']), int(z['n_items'])
    splits = {}
    for split in ('train', 'valid', 'test'):
        users = _checked_ids(z, f'{split}_users', n_users, cache)
        items = _checked_ids(z, f'{split}_items', n_items, cache)
        if users.shape != items.shape:
            raise DataError(f'{cache}: {split}_users has {users.shape[0]} rows but '
                            f'{split}_items has {items.shape[0]}; expected equal lengths')
        splits[split] = Interactions(users, items)
    image = _checked_features(z, 'image_feat', n_items, cache)
    text = _checked_features(z, 'text_feat', n_items, cache)
    if image is None and text is None:
        raise DataError(f'{cache}: holds neither image_feat nor text_feat; expected at least one '
                        f'(delete the cache to rebuild it)')
    return MMRecDataset(name=name, n_users=n_users, n_items=n_items, train=splits['train'],
                        valid=splits['valid'], test=splits['test'], image_feat=image,
                        text_feat=text)


def load_mmrec(data_dir, name: str, *, image_file: str = 'image_feat.npy',
               text_file: str = 'text_feat.npy', cache_dir=None) -> MMRecDataset:
    """Loads `<data_dir>/<name>/` (MMRec layout), converting it first if its cache is stale.

    Args:
      data_dir: folder holding the `<name>/` dataset folder.
      name: dataset name; the interactions are `<data_dir>/<name>/<name>.inter`.
      image_file, text_file: feature file names inside the dataset folder ('' = not used).
      cache_dir: folder for `<name>.npz`; None or '' = `<data_dir>/<name>/.lirdrec_jax_cache`.

    Returns:
      The dataset, ids int32 and features (n_items, d) float32.

    Raises:
      DataError: a source file is missing or malformed, or the cache is inconsistent.
    """
    dataset_dir = Path(data_dir) / name
    cache = _cache_location(dataset_dir, name, cache_dir)
    kw = dict(image_file=image_file, text_file=text_file)
    if mmrec_files.cache_is_fresh(dataset_dir, name, cache, **kw):
        return read_cache(cache, name)
    with progress.bar(2, f'converting {name} (reading, checking)', unit='step') as steps:
        arrays = mmrec_files.convert_arrays(dataset_dir, name, **kw)
        steps.set_description(f'converting {name} (writing the cache)')
        steps.update()
        try:
            mmrec_files.write_cache(cache, arrays)
        except mmrec_files.CacheWriteError as e:
            # A warning, not an error: the run has its arrays, only the next run's shortcut is
            # lost.
            mmrec_files.warn(f'{e}; this run continues without it')
        steps.update()
    return dataset_from_arrays(arrays, name, cache)


def split_summary(dataset: MMRecDataset) -> dict:
    """What identifies a dataset's split, for results.json: sizes, interaction counts and a
    SHA-256 of the train/valid/test (user, item) arrays (two runs share a split iff their
    hashes are equal; features are not hashed)."""
    digest = hashlib.sha256()
    for split in (dataset.train, dataset.valid, dataset.test):
        for column in (split.users, split.items):
            values = np.ascontiguousarray(column, dtype='<i8')
            digest.update(np.int64(values.size).tobytes())
            digest.update(values.tobytes())
    return {'dataset': dataset.name, 'n_users': int(dataset.n_users),
            'n_items': int(dataset.n_items), 'n_train': int(dataset.train.users.shape[0]),
            'n_valid': int(dataset.valid.users.shape[0]),
            'n_test': int(dataset.test.users.shape[0]), 'split_sha256': digest.hexdigest()}


def describe(dataset: MMRecDataset) -> str:
    """A short multi-line summary: sizes, interactions per split, sparsity, feature dims."""
    n_train, n_valid, n_test = (s.users.shape[0] for s in
                                (dataset.train, dataset.valid, dataset.test))
    total = n_train + n_valid + n_test
    sparsity = 1.0 - total / float(dataset.n_users * dataset.n_items)

    def dims(feat):
        return 'absent' if feat is None else f'{feat.shape[1]}-d'

    return '\n'.join([
        f'dataset {dataset.name}: {dataset.n_users} users, {dataset.n_items} items',
        f'  interactions: train {n_train}, valid {n_valid}, test {n_test} '
        f'(total {total}, sparsity {sparsity:.4%})',
        f'  users with train rows: {np.unique(dataset.train.users).size}; '
        f'evaluated users: valid {np.unique(dataset.valid.users).size}, '
        f'test {np.unique(dataset.test.users).size}',
        f'  features: image {dims(dataset.image_feat)}, text {dims(dataset.text_feat)}',
    ])
