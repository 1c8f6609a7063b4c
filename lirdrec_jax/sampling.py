"""Training batches of each kind a model can name (`BATCH_KINDS`), drawn on the host per epoch.

'bpr': BPR training triples: shuffled positives, one uniformly drawn negative per positive.
'user_rows': user ids for models that train on whole user rows (VAEs such as DGVAE): every
  user 0..n_users-1 once per epoch, shuffled, cut into batches (a PyTorch DataLoader with
  shuffle=True and drop_last=False over the rows of a user matrix); the model builds the rows.

Semantics of the reference (MMRec's TrainDataLoader), vectorised:
- every epoch the training rows are shuffled and cut into batches of `batch_size` in order;
- each row gets one negative drawn uniformly from the items that occur in training, redrawn
  while it is one of that user's training items (rejection sampling).
The reference draws with Python's `random` one row at a time; we draw whole arrays with numpy,
so the streams differ but the distribution is the same.
"""
from typing import Callable, NamedTuple

import numpy as np


class SamplerTables(NamedTuple):
    """Precomputed once per dataset.

    Attributes:
      users, items: (n,) int32 training rows.
      item_pool: (m,) int32 distinct items present in training (negatives come from here).
      seen_keys: (k,) int64 sorted distinct user * n_items + item keys of training pairs.
      n_items: item count.
    """
    users: np.ndarray
    items: np.ndarray
    item_pool: np.ndarray
    seen_keys: np.ndarray
    n_items: int


class EpochBatches(NamedTuple):
    """One epoch of triples, padded to whole batches.

    Attributes:
      users, positives, negatives: (n_batches, batch_size) int32.
      weights: (n_batches, batch_size) float32, 0 on the padding rows of the last batch.
    """
    users: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    weights: np.ndarray


def sampler_tables(train_users: np.ndarray, train_items: np.ndarray, n_items: int) -> SamplerTables:
    users = np.asarray(train_users, np.int32)
    items = np.asarray(train_items, np.int32)
    keys = np.unique(users.astype(np.int64) * n_items + items)
    return SamplerTables(users, items, np.unique(items), keys, n_items)


def is_seen(tables: SamplerTables, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(n,) bool: whether each (user, item) pair is a training interaction."""
    keys = users.astype(np.int64) * tables.n_items + items
    pos = np.searchsorted(tables.seen_keys, keys)
    pos = np.minimum(pos, tables.seen_keys.size - 1)
    return tables.seen_keys[pos] == keys


def sample_negatives(rng: np.random.Generator, tables: SamplerTables,
                     users: np.ndarray, max_rounds: int = 1000) -> np.ndarray:
    """One negative per user entry, uniform over the item pool minus the user's training items."""
    negatives = tables.item_pool[rng.integers(0, tables.item_pool.size, users.size)]
    todo = np.flatnonzero(is_seen(tables, users, negatives))
    for _ in range(max_rounds):
        if todo.size == 0:
            return negatives
        negatives[todo] = tables.item_pool[rng.integers(0, tables.item_pool.size, todo.size)]
        todo = todo[is_seen(tables, users[todo], negatives[todo])]
    raise ValueError(
        f'could not draw negatives for users {np.unique(users[todo])[:10].tolist()}: they '
        'interacted with (almost) every training item, so no negative item exists for them')


def epoch_batches(rng: np.random.Generator, tables: SamplerTables, batch_size: int) -> EpochBatches:
    """Shuffle the training rows, draw negatives, pad to whole batches."""
    n = tables.users.size
    order = rng.permutation(n)
    users, positives = tables.users[order], tables.items[order]
    negatives = sample_negatives(rng, tables, users)
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])

    def shaped(a):
        # Padding rows repeat the first row; their weight is 0, so they change nothing.
        return np.concatenate([a, np.repeat(a[:1], pad)]).reshape(n_batches, batch_size)

    return EpochBatches(shaped(users), shaped(positives), shaped(negatives),
                        weights.reshape(n_batches, batch_size))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The host RNG of one epoch, derived from (seed, epoch): resuming at any epoch redraws
    exactly the batches an uninterrupted run would have drawn."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


class UserRowBatches(NamedTuple):
    """One epoch of user ids, padded to whole batches (the 'user_rows' kind).

    Attributes:
      users: (n_batches, batch_size) int32 user ids; padding rows repeat the first user.
      weights: (n_batches, batch_size) float32, 1 on real rows, 0 on the padding rows of the
        last batch (a model's per-row means must weight by them).
    """
    users: np.ndarray
    weights: np.ndarray


def user_row_batches(rng: np.random.Generator, n_users: int, batch_size: int) -> UserRowBatches:
    """Every user 0..n_users-1 once, in a random order, cut into batches of `batch_size` (the
    last one padded). Users without training rows are included, as a DataLoader over all rows
    of the reference's user matrix includes their zero rows."""
    order = rng.permutation(n_users).astype(np.int32)
    n_batches = max(1, -(-n_users // batch_size))
    pad = n_batches * batch_size - n_users
    users = np.concatenate([order, np.repeat(order[:1], pad)]).reshape(n_batches, batch_size)
    weights = np.concatenate([np.ones(n_users, np.float32), np.zeros(pad, np.float32)])
    return UserRowBatches(users, weights.reshape(n_batches, batch_size))


class BatchKind(NamedTuple):
    """A kind of training batch: `tables(dataset) -> tables` is built once per dataset,
    `draw(rng, tables, batch_size) -> batches` once per epoch; batches are a NamedTuple of
    (n_batches, batch_size, ...) arrays whose second axis holds the rows (split over devices)."""
    tables: Callable
    draw: Callable


def _bpr_tables(dataset) -> SamplerTables:
    return sampler_tables(dataset.train.users, dataset.train.items, dataset.n_items)


def _user_row_tables(dataset) -> int:
    return int(dataset.n_users)


BATCH_KINDS = {'bpr': BatchKind(_bpr_tables, epoch_batches),
               'user_rows': BatchKind(_user_row_tables, user_row_batches)}


def batch_kind(name: str) -> BatchKind:
    try:
        return BATCH_KINDS[name]
    except KeyError:
        raise ValueError(f'unknown batch kind {name!r}; expected one of '
                         f'{", ".join(sorted(BATCH_KINDS))}') from None
