"""From raw interaction logs to MMRec's split: duplicates, iterated k-core, re-indexing and the
per-user chronological split into x_label 0/1/2.

Shared by every data command (`amazon`, `movielens`); the k-core filter and the split
(`k_core`, `temporal_split`) come from `lirdrec_jax.mmrec_files`, which the synthetic generator
uses too.

The rules, in order (each step's effect is counted for the manifest):
  1. Duplicates: a (user, item) pair that occurs more than once keeps its earliest row (ties:
     the first in the file). Implicit feedback has one positive per pair; the earliest is when
     the user first chose the item.
  2. k-core: users and items with fewer than k rows are removed, repeatedly, until every
     remaining user and item has at least k rows (removing an item can push a user below k
     and vice versa). Users need at least 3 rows (one train, one valid, one test row), so
     with k < 3 the user threshold is raised to 3 and the users this removes are counted.
  3. Re-indexing: users and items are numbered 0.. in the sorted order of their raw ids
     (string order for Amazon ASINs / reviewer ids, numeric order for MovieLens ids), so the
     numbering does not depend on the order of the input file.
  4. Split: each user's rows sorted by (timestamp, item id); the last n_test rows are test
     (x_label 2), the n_valid before them valid (1), the rest train (0), where for a user with
     n rows n_test = max(1, round_half_up(n * test_ratio)) and n_valid likewise. With the
     default 0.8/0.1/0.1 and n >= 3 every user keeps at least one train row; ratios that
     would leave a user without one are an error naming that user.
"""
from fractions import Fraction
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

# k_core and temporal_split are MMRec's preprocessing conventions, shared with the synthetic
# generator; they live in the package, next to the layout's reader.
from lirdrec_jax.mmrec_files import DataError, k_core, temporal_split

# One train, one valid and one test row.
MIN_USER_ROWS = 3


class RawInteractions(NamedTuple):
    """Interactions as read, ids coded 0.. in order of first appearance.

    Attributes:
      users: (n,) int64 codes into `user_keys`.
      items: (n,) int64 codes into `item_keys`.
      ratings: (n,) float64.
      timestamps: (n,) int64 seconds.
      user_keys: raw user id of each code (str or int).
      item_keys: raw item id of each code.
    """
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_keys: List
    item_keys: List


class SplitInteractions(NamedTuple):
    """The result of `prepare_interactions`, rows sorted by (user, timestamp, item).

    Attributes:
      users: (n,) int64 user ids 0..n_users-1.
      items: (n,) int64 item ids 0..n_items-1.
      ratings: (n,) float64.
      timestamps: (n,) int64.
      x_label: (n,) int64, 0 / 1 / 2 = train / valid / test.
      user_keys: raw id of user i at position i (length n_users).
      item_keys: raw id of item i at position i (length n_items).
    """
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    x_label: np.ndarray
    user_keys: List
    item_keys: List


class InteractionLog:
    """Accumulates rows while a raw file is parsed, coding raw ids as they first appear."""

    def __init__(self):
        self.user_codes: Dict = {}
        self.item_codes: Dict = {}
        self.users: List[int] = []
        self.items: List[int] = []
        self.ratings: List[float] = []
        self.timestamps: List[int] = []

    def add(self, user, item, rating: float, timestamp: int) -> None:
        self.users.append(self.user_codes.setdefault(user, len(self.user_codes)))
        self.items.append(self.item_codes.setdefault(item, len(self.item_codes)))
        self.ratings.append(rating)
        self.timestamps.append(timestamp)

    def __len__(self) -> int:
        return len(self.users)

    def build(self) -> RawInteractions:
        return RawInteractions(np.asarray(self.users, np.int64), np.asarray(self.items, np.int64),
                               np.asarray(self.ratings, np.float64),
                               np.asarray(self.timestamps, np.int64),
                               list(self.user_codes), list(self.item_codes))


def select(raw: RawInteractions, mask: np.ndarray) -> RawInteractions:
    """The rows where `mask` is True (codes and key lists unchanged)."""
    return raw._replace(users=raw.users[mask], items=raw.items[mask], ratings=raw.ratings[mask],
                        timestamps=raw.timestamps[mask])


def drop_duplicates(raw: RawInteractions) -> Tuple[RawInteractions, Dict[str, int]]:
    """Keeps the earliest row of each (user, item) pair (ties: the first in file order).

    Returns:
      (the kept rows in file order, counts): `duplicate_rows_same_time` are dropped rows with
      the same timestamp as the kept one (exact repeats), `duplicate_rows_later_time` the rest.
    """
    n = raw.users.shape[0]
    order = np.lexsort((np.arange(n), raw.timestamps, raw.items, raw.users))
    u, i, t = raw.users[order], raw.items[order], raw.timestamps[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    # Timestamp of the kept (first) row of each sorted row's group.
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    same_time = ~first & (t == t[group_start])
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    counts = {'duplicate_rows_same_time': int(same_time.sum()),
              'duplicate_rows_later_time': int((~first).sum() - same_time.sum())}
    return select(raw, keep), counts


def parse_split(text: str) -> Tuple[float, float, float]:
    """'0.8,0.1,0.1' (or '8,1,1', '8:1:1') -> (train, valid, test) fractions summing to 1.

    Raises:
      ValueError: not three non-negative numbers, or valid/test zero.
    """
    parts = [p for p in text.replace(':', ',').split(',')]
    try:
        values = [Fraction(p.strip()) for p in parts]
    except (ValueError, ZeroDivisionError):
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) == 0:
        raise ValueError(f'split {text!r}: expected three non-negative numbers train,valid,test '
                         f'such as 0.8,0.1,0.1')
    if values[1] == 0 or values[2] == 0:
        raise ValueError(f'split {text!r}: valid and test fractions must be > 0 (every user '
                         f'gets at least one valid and one test row)')
    total = sum(values)
    return tuple(float(v / total) for v in values)


def reindex(codes: np.ndarray, keys: Sequence) -> Tuple[np.ndarray, List]:
    """Numbers the codes present in `codes` 0.. in the sorted order of their raw keys.

    Args:
      codes: (n,) int64 codes into `keys`.
      keys: raw id of each code.

    Returns:
      ((n,) int64 new ids, raw keys in new-id order).
    """
    present = np.unique(codes)
    ordered = sorted(present.tolist(), key=keys.__getitem__)
    new_of_code = np.full(len(keys), -1, dtype=np.int64)
    new_of_code[ordered] = np.arange(len(ordered))
    return new_of_code[codes], [keys[c] for c in ordered]


def _count_distinct(codes: np.ndarray) -> int:
    return int(np.unique(codes).size)


def prepare_interactions(raw: RawInteractions, *, k: int, valid_ratio: float,
                         test_ratio: float) -> Tuple[SplitInteractions, Dict[str, int]]:
    """Duplicates, k-core, re-indexing and split (see the module docstring for the rules).

    Args:
      raw: the interactions as read (after any rating threshold or metadata filter).
      k: the k of the k-core (>= 1).
      valid_ratio, test_ratio: per-user fractions, from `parse_split`.

    Returns:
      (the split interactions, counts for the manifest).

    Raises:
      DataError: nothing survives the filter, or a user would have no train row.
    """
    if k < 1:
        raise ValueError(f'k={k}: expected k >= 1 (k=1 keeps every user and item)')
    counts = {'rows_before_duplicates_and_kcore': int(raw.users.shape[0])}
    raw, dup_counts = drop_duplicates(raw)
    counts.update(dup_counts)
    n_rows, n_users, n_items = raw.users.shape[0], _count_distinct(raw.users), \
        _count_distinct(raw.items)

    user_k = max(k, MIN_USER_ROWS)
    keep = k_core(raw.users, raw.items, k, user_k=user_k)
    if user_k != k:
        plain = k_core(raw.users, raw.items, k)
        counts['users_dropped_below_3_rows'] = (_count_distinct(raw.users[plain])
                                                - _count_distinct(raw.users[keep]))
    if not keep.any():
        raise DataError(f'no interactions survive the {k}-core filter (users need >= {user_k} '
                        f'rows, items >= {k}; {n_rows} rows, {n_users} users and {n_items} items '
                        f'before it); expected a larger or denser dataset, or a smaller --k')
    raw = select(raw, keep)
    counts['kcore_rows_dropped'] = int(n_rows - raw.users.shape[0])
    counts['kcore_users_dropped'] = n_users - _count_distinct(raw.users)
    counts['kcore_items_dropped'] = n_items - _count_distinct(raw.items)

    users, user_keys = reindex(raw.users, raw.user_keys)
    items, item_keys = reindex(raw.items, raw.item_keys)
    order = np.lexsort((items, raw.timestamps, users))  # by user, then time, item breaks ties
    users, items = users[order], items[order]
    ratings, timestamps = raw.ratings[order], raw.timestamps[order]
    labels = temporal_split(users, timestamps, valid_ratio, test_ratio)

    n_train = np.bincount(users[labels == 0], minlength=len(user_keys))
    if (n_train == 0).any():
        u = int(np.flatnonzero(n_train == 0)[0])
        n_u = int((users == u).sum())
        raise DataError(f'user {user_keys[u]!r} has {n_u} interactions, all of them valid/test '
                        f'with valid_ratio={valid_ratio:g} and test_ratio={test_ratio:g} '
                        f'({int((n_train == 0).sum())} such user(s)); expected split fractions '
                        f'that leave every user at least one train row (e.g. 0.8,0.1,0.1)')
    split = SplitInteractions(users, items, ratings, timestamps, labels, user_keys, item_keys)
    return split, counts
