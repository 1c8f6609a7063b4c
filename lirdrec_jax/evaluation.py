"""Full-sort top-k evaluation with the semantics of the MMRec toolbox (the reference).

Per split (valid or test):
- evaluated users are the distinct users of the split, in order of first appearance;
- every user is scored against ALL items, its TRAINING items are set to -1e10 (the reference's
  constant, not -inf, so masked items still fill the list when fewer unmasked items than k exist),
  and the top max(topk) items are kept (descending score, ties by lower item index);
- hit[u, r] says whether the r-th item is one of the user's items in the split; pos_len[u] counts
  the user's rows in the split (a duplicated (user, item) row counts twice, as in the reference);
- recall / ndcg / precision / map at each k are averaged over users and rounded to 4 decimals.
  Recall@k divides by pos_len (MMRec); `recall_denominator='min_k_test_items'` divides by
  min(k, pos_len) instead, as some references' own evaluators do (e.g. DGVAE's).
- a model scores with the dot product of its user and item embeddings, or with its own
  `score` function (`base.Model.score`, e.g. DGVAE's mixture over factors).

Scoring and top-k run on the accelerator in fixed-shape batches (one compilation per split);
given a `parallel.Partitioner`, each device ranks its own batch of users (the users are split
over the devices; every device holds all items), with per-user results identical to one device.
Hits and metrics are vectorised numpy on the host, with the same arithmetic as the reference so
that the rounded values agree.

Two speed-ups leave every result unchanged (docs/performance.md, "Evaluation"): valid and test
share one ranking of their users (`SharedRanking`: both mask the same training items), and the
items are scanned best-first for the mean user (`item_order`), which makes XLA:CPU's top-k
cheaper, with exact tie repairs (`_topk_batch`).
"""
import functools
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import parallel, progress

DEFAULT_METRICS: Tuple[str, ...] = ('recall', 'ndcg', 'precision', 'map')
DEFAULT_KS: Tuple[int, ...] = (5, 10, 20, 50)
MASK_SCORE = -1e10  # the reference's value for masked training items
# What Recall@k divides the hits by: 'test_items' = the user's rows in the split (MMRec), or
# 'min_k_test_items' = min(k, that count) (e.g. DGVAE's own evaluator).
RECALL_DENOMINATORS: Tuple[str, ...] = ('test_items', 'min_k_test_items')


class EvalSplit(NamedTuple):
    """Everything one split needs for evaluation, precomputed once (numpy, host).

    Attributes:
      users: (n_eval,) int32 evaluated user ids, in order of first appearance in the split.
      truth_indptr: (n_eval + 1,) int64 CSR row pointers over `users` into `truth_items`.
      truth_items: (nnz,) int32 the split's items of each evaluated user (split row order,
        duplicates kept).
      mask_indptr: (n_eval + 1,) int64 CSR row pointers over `users` into `mask_items`.
      mask_items: (m,) int32 the TRAINING items of each evaluated user (masked when ranking).
    """
    users: np.ndarray
    truth_indptr: np.ndarray
    truth_items: np.ndarray
    mask_indptr: np.ndarray
    mask_items: np.ndarray

    @property
    def n_eval(self) -> int:
        """Number of evaluated users."""
        return int(self.users.shape[0])

    @property
    def pos_len(self) -> np.ndarray:
        """(n_eval,) int64 rows per evaluated user in the split (the metrics' denominators)."""
        return np.diff(self.truth_indptr)


# ----------------------------------------------------------------------------------------------
# Building a split
# ----------------------------------------------------------------------------------------------

def first_appearance_unique(values: np.ndarray) -> np.ndarray:
    """Distinct values in order of first appearance (pandas' `Series.unique` order).

    Args:
      values: (n,) integer array.

    Returns:
      (u,) distinct values of `values`, ordered by the index of their first occurrence.
    """
    uniq, first = np.unique(values, return_index=True)
    return uniq[np.argsort(first, kind='stable')]


def _csr_by_row(row_of: np.ndarray, items: np.ndarray, n_rows: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Groups `items` by `row_of` into CSR, keeping the input order within a row.

    Args:
      row_of: (n,) int row index in [0, n_rows) of each entry, or -1 to drop the entry.
      items: (n,) int item of each entry.
      n_rows: number of CSR rows.

    Returns:
      indptr: (n_rows + 1,) int64; items_sorted: (nnz,) int32.
    """
    keep = row_of >= 0
    row_of, items = row_of[keep], items[keep]
    # A stable sort keeps the file order inside each user's group, like pandas' groupby.
    order = np.argsort(row_of, kind='stable')
    counts = np.bincount(row_of, minlength=n_rows)
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, items[order].astype(np.int32)


def build_eval_split(split_users: np.ndarray, split_items: np.ndarray,
                     train_users: np.ndarray, train_items: np.ndarray) -> EvalSplit:
    """Precomputes the evaluated users, their ground truth and their training masks.

    Args:
      split_users: (n,) int user id of each row of the split (valid or test).
      split_items: (n,) int item id of each row of the split.
      train_users: (t,) int user id of each training row.
      train_items: (t,) int item id of each training row.

    Returns:
      The split's `EvalSplit`. Training users that are not evaluated are dropped from the mask;
      an evaluated user without training rows gets an empty mask.
    """
    split_users = np.asarray(split_users, np.int64).reshape(-1)
    split_items = np.asarray(split_items, np.int64).reshape(-1)
    train_users = np.asarray(train_users, np.int64).reshape(-1)
    train_items = np.asarray(train_items, np.int64).reshape(-1)
    if split_users.shape != split_items.shape or train_users.shape != train_items.shape:
        raise ValueError('users and items of a split must have the same length')

    users = first_appearance_unique(split_users)
    n_eval = users.shape[0]
    max_user = max(int(split_users.max(initial=-1)), int(train_users.max(initial=-1)))
    # user id -> evaluated row, -1 for users that are not evaluated.
    row_of_user = np.full(max_user + 1, -1, np.int64)
    row_of_user[users] = np.arange(n_eval)

    truth_indptr, truth_items = _csr_by_row(row_of_user[split_users], split_items, n_eval)
    mask_indptr, mask_items = _csr_by_row(row_of_user[train_users], train_items, n_eval)
    return EvalSplit(users.astype(np.int32), truth_indptr, truth_items, mask_indptr, mask_items)


# ----------------------------------------------------------------------------------------------
# Ranking on the accelerator
# ----------------------------------------------------------------------------------------------

def dot_scores(users: jax.Array, items: jax.Array) -> jax.Array:
    """The default score: (b, d) user rows times (n_items, d) item embeddings, transposed."""
    # HIGHEST: on TPU/GPU the default f32 matmul uses reduced precision, which would reorder
    # near-tied items relative to the float32 reference.
    return jnp.matmul(users, items.T, precision=jax.lax.Precision.HIGHEST)


def _masked_scores(user_emb, item_emb, batch_users: jax.Array, mask_rows: jax.Array,
                   mask_cols: jax.Array, score=None) -> jax.Array:
    """(b, n_items) scores of a batch of users, masked pairs set to MASK_SCORE.

    `score(user rows, item_emb) -> (b, n_items)` (None: `dot_scores`); `user_emb` may then be
    any pytree of (n_users, ...) arrays, of which the batch's rows are passed."""
    rows = jax.tree.map(lambda u: u[batch_users], user_emb)
    scores = (score or dot_scores)(rows, item_emb)
    # Padding pairs point at row b (out of range) and are dropped, so the mask length can be a
    # fixed per-split constant without touching real rows.
    return scores.at[mask_rows, mask_cols].set(MASK_SCORE, mode='drop')


def _topk_exact(user_emb, item_emb, batch_users, mask_rows, mask_cols, k: int,
               score=None) -> jax.Array:
    return jax.lax.top_k(_masked_scores(user_emb, item_emb, batch_users, mask_rows, mask_cols,
                                        score), k)[1].astype(jnp.int32)


def total_order_key(x: jax.Array) -> jax.Array:
    """int32 keys that order float32 values as `lax.top_k` does (a total order: -0.0 < 0.0,
    NaNs beyond the infinities): equal keys exactly when top_k treats two values as tied."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def item_order(user_emb: jax.Array, item_emb: jax.Array) -> jax.Array:
    """(n_items,) int32 item ids by descending score for the mean user (a speed hint for
    `_topk_batch`; any permutation gives the same results)."""
    priority = item_emb @ jnp.mean(user_emb, axis=0)
    return jnp.argsort(-priority, stable=True).astype(jnp.int32)


item_order_jit = jax.jit(item_order)


def _topk_batch(user_emb: jax.Array, item_emb: jax.Array, order: Optional[jax.Array],
                batch_users: jax.Array, mask_rows: jax.Array, mask_cols: jax.Array, *,
                k: int) -> jax.Array:
    """Top-k items of one batch of users, training items masked.

    Args:
      user_emb: (n_users, d) float32 all user embeddings.
      item_emb: (n_items, d) float32 all item embeddings.
      order: (n_items,) int32 a permutation of the items to scan in (`item_order`), or None.
      batch_users: (b,) int32 user ids of the batch (padding rows included).
      mask_rows: (p,) int32 row in [0, b) of each masked pair; == b for padding pairs.
      mask_cols: (p,) int32 item of each masked pair.
      k: number of items to keep (static).

    Returns:
      (b, k) int32 item ids, best first; ties go to the lower item index (`lax.top_k`'s
      order), whatever `order` is.

    With `order`, the items' columns are scored in that order. XLA:CPU's top-k keeps a heap of
    the k best so far and scans the row: when the likely winners come first, most items are
    rejected by one comparison (Baby scale: 0.66 -> 0.45 s for all users). The scores are the
    same numbers (each is the same dot product of the same rows), so the top-k VALUES are the
    same; which items carry them can differ only among items with equal scores, because top_k
    breaks ties by column position. Two repairs make the result exactly `lax.top_k`'s on the
    original order: the k winners are re-sorted by (score descending, item id ascending), and
    if any row's k-th and (k+1)-th scores are equal (a tie across the cut, where the permuted
    scan could pick a different item), the batch is recomputed in the original order.
    """
    n_items = item_emb.shape[0]
    if order is None or k >= n_items:
        return _topk_exact(user_emb, item_emb, batch_users, mask_rows, mask_cols, k)
    position = jnp.zeros_like(order).at[order].set(jnp.arange(n_items, dtype=order.dtype))
    scores = _masked_scores(user_emb, item_emb[order], batch_users, mask_rows,
                            position[mask_cols])
    values, columns = jax.lax.top_k(scores, k + 1)
    keys, items = total_order_key(values), order[columns]
    _, ranked = jax.lax.sort((~keys[:, :k], items[:, :k]), dimension=1, num_keys=2)
    tie_at_cut = jnp.any(keys[:, k - 1] == keys[:, k])
    return jax.lax.cond(
        tie_at_cut,
        lambda: _topk_exact(user_emb, item_emb, batch_users, mask_rows, mask_cols, k),
        lambda: ranked.astype(jnp.int32))


def _batched_mask_pairs(split: EvalSplit, batch: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-batch (row, col) masking pairs, padded to one length for the whole split.

    Args:
      split: the split.
      batch: users per batch.

    Returns:
      rows, cols: (n_batches, p) int32 with p = the largest number of training pairs in any
        batch (at least 1); padding pairs have row == batch (dropped in `_topk_batch`).
    """
    n_batches = -(-split.n_eval // batch)
    starts = split.mask_indptr[np.arange(n_batches) * batch]
    ends = split.mask_indptr[np.minimum((np.arange(n_batches) + 1) * batch, split.n_eval)]
    p = max(1, int((ends - starts).max(initial=0)))
    # Local row of every pair: evaluated row index modulo the batch it falls in.
    pair_row = np.repeat(np.arange(split.n_eval, dtype=np.int64), np.diff(split.mask_indptr))
    rows = np.full((n_batches, p), batch, np.int32)
    cols = np.zeros((n_batches, p), np.int32)
    for b in range(n_batches):  # loop over batches, not users
        s, e = int(starts[b]), int(ends[b])
        rows[b, :e - s] = pair_row[s:e] - b * batch
        cols[b, :e - s] = split.mask_items[s:e]
    return rows, cols


def ranking_blocks(split: EvalSplit, batch_size: int, n_devices: int
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks of users `full_sort_topk` ranks, one per device and dispatch.

    Args:
      split: the ranked split.
      batch_size: users per block (capped at n_eval to avoid useless padding).
      n_devices: the device count; the number of blocks is a multiple of it.

    Returns:
      users: (n_blocks, batch) int32 the split's users in order, then user 0 as padding (whole
        dummy blocks at the end).
      rows, cols: (n_blocks, p) int32 the masking pairs of each block (`_batched_mask_pairs`);
        a dummy block's pairs all have row == batch (dropped).
    """
    batch = max(1, min(int(batch_size), split.n_eval))
    n_batches = -(-split.n_eval // batch)
    n_blocks = -(-n_batches // n_devices) * n_devices
    # Pad the last batch with user 0; its rows are cut off by the caller.
    users = np.zeros(n_blocks * batch, np.int32)
    users[:split.n_eval] = split.users
    rows, cols = _batched_mask_pairs(split, batch)
    rows = np.concatenate([rows, np.full((n_blocks - n_batches, rows.shape[1]), batch,
                                         np.int32)])  # dummy blocks: every pair dropped
    cols = np.concatenate([cols, np.zeros((n_blocks - n_batches, cols.shape[1]), np.int32)])
    return users.reshape(n_blocks, batch), rows, cols


@functools.lru_cache(maxsize=None)
def _sharded_topk(partitioner, k: int, ordered: bool, score=None):
    """`_topk_batch` once per device on that device's block of users (cached per mesh, k,
    whether the item order is used, and the score function)."""
    def per_device(user_emb, item_emb, order, users, rows, cols):
        # users: (batch,), rows/cols: (1, p): this device's block.
        if score is not None:  # a model's own score: no item order (it is a dot-product hint)
            return _topk_exact(user_emb, item_emb, users, rows[0], cols[0], k, score)
        return _topk_batch(user_emb, item_emb, order if ordered else None, users, rows[0],
                           cols[0], k=k)
    return partitioner.map_blocks(per_device, n_replicated=3, n_split=3)


def full_sort_topk(user_emb, item_emb, split: EvalSplit, *, k: int = 50,
                   batch_size: int = 512, partitioner=None,
                   order_items: bool = True, score=None) -> np.ndarray:
    """Ranks all items for every evaluated user, training items masked with -1e10.

    Args:
      user_emb: (n_users, d) float32, jax or numpy.
      item_emb: (n_items, d) float32, jax or numpy.
      split: the evaluated split.
      k: list length; must not exceed n_items.
      batch_size: users per accelerator batch (capped at n_eval to avoid useless padding); with
        a partitioner, users per device and dispatch.
      partitioner: a `parallel.Partitioner` to spread the batches over its devices; None: the
        default device (`parallel.single_device`).
      order_items: scan the items in `item_order` (faster top-k on the CPU; the same result,
        see `_topk_batch`).
      score: a model's own `score(user rows, item_emb) -> (b, n_items)` (`base.Model.score`);
        `user_emb` and `item_emb` are then any pytrees it reads (user leaves (n_users, ...)).
        None: `dot_scores` of (n_users, d) and (n_items, d) embeddings.

    Returns:
      (n_eval, k) int32 item ids, best first, rows in `split.users` order.
    """
    partitioner = partitioner or parallel.single_device()
    if score is None:
        n_items = item_emb.shape[0]
    else:
        one_user = jax.tree.map(lambda u: jax.ShapeDtypeStruct((1,) + tuple(np.shape(u)[1:]),
                                                               jnp.float32), user_emb)
        n_items = jax.eval_shape(score, one_user, item_emb).shape[1]
    if not 0 < k <= n_items:
        # Every caller passes max(eval.topk); train.check_point_config normally rejects it first.
        raise ValueError(f'config field eval.topk: the largest cutoff is {k}; expected cutoffs '
                         f'in [1, n_items={n_items}] (the number of items)')
    if split.n_eval == 0:
        return np.zeros((0, k), np.int32)
    n_dev = partitioner.n_devices
    users, rows, cols = ranking_blocks(split, batch_size, n_dev)
    n_blocks = users.shape[0]
    user_emb, item_emb = partitioner.replicate(jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32), (user_emb, item_emb)))
    if score is None:
        order = partitioner.replicate(item_order_jit(user_emb, item_emb))
    else:
        order = partitioner.replicate(jnp.arange(n_items, dtype=jnp.int32))  # unused
    ranked = _sharded_topk(partitioner, k, bool(order_items), score)
    outs = []
    for g in range(0, n_blocks, n_dev):
        blocks = (users[g:g + n_dev].reshape(-1), rows[g:g + n_dev], cols[g:g + n_dev])
        outs.append(ranked(user_emb, item_emb, order,
                           *(partitioner.split(a, 0) for a in blocks)))
    with progress.bar(split.n_eval, 'evaluation', unit='user') as done:
        host, rows_done = [], 0
        for o in outs:  # dispatched above; each block is waited for here
            host.append(partitioner.to_host(o))
            real = min(host[-1].shape[0], split.n_eval - rows_done)  # without the padding
            rows_done += real
            done.update(real)
    return np.concatenate(host, axis=0)[:split.n_eval]


# ----------------------------------------------------------------------------------------------
# Hits and metrics on the host
# ----------------------------------------------------------------------------------------------

def hit_matrix(topk: np.ndarray, split: EvalSplit) -> np.ndarray:
    """Whether each recommended item is among the user's items in the split.

    Args:
      topk: (n_eval, k) int item ids, rows in `split.users` order.
      split: the split that provides the ground truth.

    Returns:
      (n_eval, k) bool.
    """
    topk = np.asarray(topk, np.int64)
    n_eval = topk.shape[0]
    if n_eval != split.n_eval:
        raise ValueError(f'topk has {n_eval} rows, the split {split.n_eval} users')
    # Encode (row, item) pairs as one int64 key and look them up in the sorted truth keys.
    width = int(max(split.truth_items.max(initial=0), topk.max(initial=0))) + 1
    truth_rows = np.repeat(np.arange(n_eval, dtype=np.int64), split.pos_len)
    truth_keys = np.sort(truth_rows * width + split.truth_items)
    keys = np.arange(n_eval, dtype=np.int64)[:, None] * width + topk
    if truth_keys.size == 0:
        return np.zeros(topk.shape, bool)
    pos = np.minimum(np.searchsorted(truth_keys, keys), truth_keys.size - 1)
    return truth_keys[pos] == keys


# Each metric's per-user curve: (n_eval, K) values at every cutoff 1..K; the reported metric is
# its mean over users (`topk_metrics`), the per-user values feed significance tests.

def _recall(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    """(n, K) recall at every cutoff 1..K (hits / pos_len, MMRec's)."""
    return np.cumsum(hits, axis=1) / pos_len.reshape(-1, 1)


def _recall_min_k(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    """(n, K) recall at every cutoff k = 1..K with hits / min(k, pos_len)
    (`recall_denominator='min_k_test_items'`): a user with more held-out items than k can
    reach 1."""
    ranks = np.arange(1, hits.shape[1] + 1)
    return np.cumsum(hits, axis=1) / np.minimum(ranks[None, :], pos_len[:, None])


def _precision(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    """(n, K) precision at every cutoff 1..K."""
    del pos_len  # precision divides by the cutoff only
    return np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)


def _ndcg(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    """(n, K) NDCG at every cutoff 1..K.

    IDCG@k sums the ideal gains over the first min(pos_len, k) ranks.
    """
    n_ranks = hits.shape[1]
    gains = 1.0 / np.log2(np.arange(1, n_ranks + 1) + 1.0)  # (K,)
    ideal = np.cumsum(gains)  # (K,) IDCG with unlimited relevant items
    # Beyond min(pos_len, K) ranks the ideal list runs out of relevant items: freeze IDCG there.
    cutoff = np.minimum(np.arange(n_ranks)[None, :], np.minimum(pos_len, n_ranks)[:, None] - 1)
    idcg = ideal[cutoff]  # (n, K)
    dcg = np.cumsum(np.where(hits, gains, 0.0), axis=1)
    return dcg / idcg


def _map(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    """(n, K) average precision at every cutoff 1..K (MAP is its mean over users).

    AP@k = sum of precision@r over hit ranks r <= k, divided by min(pos_len, k).
    """
    n_ranks = hits.shape[1]
    ranks = np.arange(1, n_ranks + 1)
    prec = np.cumsum(hits, axis=1) / ranks
    sum_prec = np.cumsum(prec * hits.astype(np.float64), axis=1)
    denom = np.minimum(ranks[None, :], pos_len[:, None])
    return sum_prec / denom


_METRIC_FNS = {'recall': _recall, 'ndcg': _ndcg, 'precision': _precision, 'map': _map}


def _round4(value: np.floating) -> float:
    """Rounds like the reference: builtin `round` on a numpy float64 (numpy's rounding rule,
    which can differ from Python's on exact decimal ties such as 0.11115)."""
    return float(round(np.float64(value), 4))


def per_user_curves(hits: np.ndarray, pos_len: np.ndarray, *,
                    metrics: Sequence[str] = DEFAULT_METRICS,
                    recall_denominator: str = 'test_items') -> Dict[str, np.ndarray]:
    """{metric: (n_eval, K) float64 per-user values at every cutoff 1..K} of a hit matrix.

    Args: as `topk_metrics`.
    """
    hits = np.asarray(hits, bool)
    pos_len = np.asarray(pos_len, np.int64).reshape(-1)
    if hits.ndim != 2 or hits.shape[0] != pos_len.shape[0]:
        raise ValueError(f'hits {hits.shape} and pos_len {pos_len.shape} disagree')
    if hits.shape[0] == 0:
        raise ValueError('no users to evaluate')
    if (pos_len < 1).any():
        raise ValueError('every evaluated user needs at least one item in the split')
    if recall_denominator not in RECALL_DENOMINATORS:
        raise ValueError(f'config field eval.recall_denominator = {recall_denominator!r}; '
                         f'expected one of {RECALL_DENOMINATORS}')
    fns = dict(_METRIC_FNS)
    if recall_denominator == 'min_k_test_items':
        fns['recall'] = _recall_min_k
    curves = {}
    for metric in metrics:
        name = metric.lower()
        if name not in _METRIC_FNS:
            raise ValueError(f'unknown metric {metric!r}; expected one of {sorted(_METRIC_FNS)}')
        curves[name] = fns[name](hits, pos_len)
    return curves


def _check_cutoffs(ks: Sequence[int], n_ranks: int) -> None:
    if max(ks) > n_ranks or min(ks) < 1:
        raise ValueError(f'cutoffs {tuple(ks)} must be in [1, {n_ranks}]')


def topk_metrics(hits: np.ndarray, pos_len: np.ndarray, *,
                 metrics: Sequence[str] = DEFAULT_METRICS,
                 ks: Sequence[int] = DEFAULT_KS,
                 recall_denominator: str = 'test_items') -> Dict[str, float]:
    """Averaged, rounded top-k metrics from a hit matrix.

    Args:
      hits: (n_eval, K) bool, hits[u, r] for the (r+1)-th ranked item; K >= max(ks).
      pos_len: (n_eval,) int >= 1 number of the user's rows in the split.
      metrics: names among recall, ndcg, precision, map (case-insensitive).
      ks: cutoffs.
      recall_denominator: one of RECALL_DENOMINATORS ('test_items': MMRec's).

    Returns:
      {'<metric>@<k>': value} in the order metrics x ks, each rounded to 4 decimals.
    """
    return topk_metrics_and_users(hits, pos_len, metrics=metrics, ks=ks,
                                  recall_denominator=recall_denominator)[0]


def topk_metrics_and_users(hits: np.ndarray, pos_len: np.ndarray, *,
                           metrics: Sequence[str] = DEFAULT_METRICS,
                           ks: Sequence[int] = DEFAULT_KS,
                           recall_denominator: str = 'test_items') -> tuple:
    """(`topk_metrics`, {'<metric>@<k>': (n_eval,) float64 per-user values}): the reported
    value of each metric is the mean of its per-user values, rounded to 4 decimals."""
    curves = per_user_curves(hits, pos_len, metrics=metrics,
                             recall_denominator=recall_denominator)
    _check_cutoffs(ks, np.shape(hits)[1])
    result, per_user = {}, {}
    for name, curve in curves.items():
        mean = curve.mean(axis=0)
        for k in ks:
            result[f'{name}@{k}'] = _round4(mean[k - 1])
            per_user[f'{name}@{k}'] = curve[:, k - 1].copy()
    return result, per_user


def evaluate_full_sort(user_emb, item_emb, split: EvalSplit, *,
                       metrics: Sequence[str] = DEFAULT_METRICS,
                       ks: Sequence[int] = DEFAULT_KS,
                       batch_size: int = 512, partitioner=None, score=None,
                       recall_denominator: str = 'test_items') -> Dict[str, float]:
    """Full-sort evaluation of embeddings on one split.

    Args:
      user_emb: (n_users, d) float32.
      item_emb: (n_items, d) float32.
      split: the evaluated split.
      metrics, ks: see `topk_metrics`.
      batch_size: users per accelerator batch (per device with a partitioner).
      partitioner, score: see `full_sort_topk`.
      recall_denominator: see `topk_metrics`.

    Returns:
      {'<metric>@<k>': value}, see `topk_metrics`.
    """
    topk = full_sort_topk(user_emb, item_emb, split, k=max(ks), batch_size=batch_size,
                          partitioner=partitioner, score=score)
    return topk_metrics(hit_matrix(topk, split), split.pos_len, metrics=metrics, ks=ks,
                        recall_denominator=recall_denominator)


class SharedRanking(NamedTuple):
    """One ranking that serves several splits at once.

    Valid and test both mask exactly the user's TRAINING items (the reference never masks valid
    items when testing), so a user's top-k list is the same for both: ranking the union of
    their users once halves the evaluation work and gives the same lists as ranking each split.

    Attributes:
      ranked: an EvalSplit over the union of the splits' users (first appearance over the
        splits in order), with their training masks; its ground truth is not used.
      rows: per split, (n_eval,) int64 the row of `ranked` of each of that split's users.
    """
    ranked: EvalSplit
    rows: Tuple[np.ndarray, ...]


def build_shared_ranking(split_users: Sequence[np.ndarray], split_items: Sequence[np.ndarray],
                         train_users: np.ndarray, train_items: np.ndarray) -> SharedRanking:
    """The SharedRanking of several splits (arguments as for `build_eval_split`, one array per
    split in `split_users`/`split_items`)."""
    ranked = build_eval_split(np.concatenate([np.asarray(u).reshape(-1) for u in split_users]),
                              np.concatenate([np.asarray(i).reshape(-1) for i in split_items]),
                              train_users, train_items)
    row_of_user = np.full(int(ranked.users.max(initial=-1)) + 1, -1, np.int64)
    row_of_user[ranked.users] = np.arange(ranked.n_eval)
    rows = tuple(row_of_user[first_appearance_unique(np.asarray(u, np.int64).reshape(-1))]
                 for u in split_users)
    return SharedRanking(ranked, rows)


def evaluate_shared(user_emb, item_emb, shared: SharedRanking, splits: Sequence[EvalSplit], *,
                    metrics: Sequence[str] = DEFAULT_METRICS, ks: Sequence[int] = DEFAULT_KS,
                    batch_size: int = 512, partitioner=None, score=None,
                    recall_denominator: str = 'test_items',
                    per_user: bool = False) -> tuple:
    """`evaluate_full_sort` of every split in `splits` (the splits `shared` was built from, in
    the same order) from one ranking of their users. Returns one metric dict per split; with
    `per_user`, one (metric dict, per-user dict) pair per split (`topk_metrics_and_users`,
    rows in `split.users` order)."""
    if len(splits) != len(shared.rows):
        raise ValueError(f'{len(splits)} splits for a ranking built from {len(shared.rows)}')
    topk = full_sort_topk(user_emb, item_emb, shared.ranked, k=max(ks), batch_size=batch_size,
                          partitioner=partitioner, score=score)
    outcomes = tuple(topk_metrics_and_users(hit_matrix(topk[rows], split), split.pos_len,
                                            metrics=metrics, ks=ks,
                                            recall_denominator=recall_denominator)
                     for rows, split in zip(shared.rows, splits))
    return outcomes if per_user else tuple(result for result, _ in outcomes)


# ----------------------------------------------------------------------------------------------
# Most-popular baseline
# ----------------------------------------------------------------------------------------------

def popularity_scores(train_items: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items,) float32 number of training rows of each item."""
    counts = np.bincount(np.asarray(train_items, np.int64).reshape(-1), minlength=n_items)
    return counts[:n_items].astype(np.float32)


def evaluate_popularity(train_items: np.ndarray, n_items: int, split: EvalSplit, *,
                        metrics: Sequence[str] = DEFAULT_METRICS,
                        ks: Sequence[int] = DEFAULT_KS,
                        batch_size: int = 512, partitioner=None) -> Dict[str, float]:
    """Most-popular baseline: every user gets the same global ranking, own training items masked.

    Implemented as a rank-1 model (user vectors of ones, item vectors = popularity) so it goes
    through exactly the same masking, tie-breaking and metrics as the learned models; counts
    are integers below 2**24, so the float32 scores are exact.

    Args:
      train_items: (t,) int item of each training row.
      n_items: item count.
      split: the evaluated split.
      metrics, ks, batch_size, partitioner: see `evaluate_full_sort`.

    Returns:
      {'<metric>@<k>': value}, see `topk_metrics`.
    """
    pop = popularity_scores(train_items, n_items)[:, None]  # (n_items, 1)
    n_users = int(split.users.max(initial=0)) + 1
    ones = np.ones((n_users, 1), np.float32)
    return evaluate_full_sort(ones, pop, split, metrics=metrics, ks=ks, batch_size=batch_size,
                              partitioner=partitioner)
