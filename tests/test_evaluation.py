"""Tests of full-sort top-k evaluation against hand computation and a slow loop reference."""
import math

import chex
import jax
import numpy as np
import pytest

from lirdrec_jax import evaluation

METRICS = ('recall', 'ndcg', 'precision', 'map')
KS = (5, 10, 20, 50)


# ----------------------------------------------------------------------------------------------
# Independent slow reference, written from the definitions with plain loops
# ----------------------------------------------------------------------------------------------

def slow_rankings(user_emb, item_emb, split_users, split_items, train_users, train_items, k):
    """Per evaluated user (first-appearance order): the top-k item ids, by explicit sorting."""
    eval_users = []
    for u in split_users:
        if int(u) not in eval_users:
            eval_users.append(int(u))
    rankings = []
    for u in eval_users:
        scores = [float(np.float32(s)) for s in
                  (user_emb[u].astype(np.float32) @ item_emb.T.astype(np.float32))]
        for tu, ti in zip(train_users, train_items):
            if int(tu) == u:
                scores[int(ti)] = float(np.float32(-1e10))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        rankings.append(order[:k])
    return eval_users, rankings


def slow_metrics(eval_users, rankings, split_users, split_items, metrics, ks):
    """Averaged metrics from the definitions (no rounding)."""
    out = {}
    per_user = {f'{m}@{k}': [] for m in metrics for k in ks}
    for u, ranking in zip(eval_users, rankings):
        truth = [int(i) for uu, i in zip(split_users, split_items) if int(uu) == u]
        pos_len = len(truth)  # rows, duplicates included
        hit = [item in truth for item in ranking]
        for k in ks:
            n_hit = sum(hit[:k])
            per_user[f'recall@{k}'].append(n_hit / pos_len)
            per_user[f'precision@{k}'].append(n_hit / k)
            dcg = sum(1 / math.log2(r + 1) for r in range(1, k + 1) if hit[r - 1])
            idcg = sum(1 / math.log2(r + 1) for r in range(1, min(pos_len, k) + 1))
            per_user[f'ndcg@{k}'].append(dcg / idcg)
            ap = sum(sum(hit[:r]) / r for r in range(1, k + 1) if hit[r - 1])
            per_user[f'map@{k}'].append(ap / min(pos_len, k))
    for key, values in per_user.items():
        out[key] = sum(values) / len(values)
    return out


def random_splits(rng, n_users, n_items, heavy_user, heavy_count):
    """Random train rows per user, test rows disjoint from train, rows shuffled."""
    train_u, train_i, test_u, test_i = [], [], [], []
    for u in range(n_users):
        n_train = heavy_count if u == heavy_user else rng.integers(1, 8)
        items = rng.permutation(n_items)
        train_u += [u] * n_train
        train_i += list(items[:n_train])
        if u % 7 == 3:  # some users have no test rows and are not evaluated
            continue
        n_test = rng.integers(1, 6)
        test_u += [u] * n_test
        test_i += list(items[n_train:n_train + n_test])
    # A duplicated test row counts twice in pos_len.
    test_u.append(test_u[0])
    test_i.append(test_i[0])
    perm_tr, perm_te = rng.permutation(len(train_u)), rng.permutation(len(test_u))
    return (np.array(train_u)[perm_tr], np.array(train_i)[perm_tr],
            np.array(test_u)[perm_te], np.array(test_i)[perm_te])


# ----------------------------------------------------------------------------------------------
# 1. Hand-computed metrics
# ----------------------------------------------------------------------------------------------

def test_topk_metrics_hand_computed():
    # Gains: g1 = 1, g2 = 1/log2(3) = 0.6309298, g3 = 1/log2(4) = 0.5.
    # User A: hits [1,0,1], pos_len 2.
    # User B: hits [0,1,1], pos_len 5 > k for every k (min(pos_len, k) matters).
    # User C: hits [0,0,0], pos_len 1 (zero hits).
    hits = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], bool)
    pos_len = np.array([2, 5, 1])
    got = evaluation.topk_metrics(hits, pos_len, ks=(1, 2, 3))
    expected = {
        # recall: A 1/2, 1/2, 2/2; B 0, 1/5, 2/5; C 0.
        # @1 0.5/3 = 0.16667; @2 0.7/3 = 0.23333; @3 1.4/3 = 0.46667.
        'recall@1': 0.1667, 'recall@2': 0.2333, 'recall@3': 0.4667,
        # ndcg: A @1 1/1 = 1; @2 1/(1+g2) = 0.613147; @3 (1+g3)/(1+g2) = 0.919721
        #       (IDCG stops at min(2, 3) = 2 ranks).
        #       B @1 0; @2 g2/(1+g2) = 0.386853; @3 (g2+g3)/(1+g2+g3) = 0.530721
        #       (IDCG over min(5, k) = k ranks, not 5).
        # @1 1/3 = 0.33333; @2 (0.613147+0.386853)/3 = 0.33333; @3 1.450442/3 = 0.483481.
        'ndcg@1': 0.3333, 'ndcg@2': 0.3333, 'ndcg@3': 0.4835,
        # precision: A 1, 1/2, 2/3; B 0, 1/2, 2/3; C 0.
        # @1 1/3; @2 1/3; @3 (4/3)/3 = 0.44444.
        'precision@1': 0.3333, 'precision@2': 0.3333, 'precision@3': 0.4444,
        # map: A @1 1/min(2,1) = 1; @2 1/2 = 0.5; @3 (1 + 2/3)/2 = 0.83333.
        #      B @1 0; @2 (1/2)/min(5,2) = 0.25; @3 (1/2 + 2/3)/3 = 0.38889.
        # @1 1/3; @2 0.75/3 = 0.25; @3 1.22222/3 = 0.40741.
        'map@1': 0.3333, 'map@2': 0.25, 'map@3': 0.4074,
    }
    assert got == expected


def test_per_user_values_hand_computed():
    """The per-user values behind the averages above (same three users), unrounded, and the
    reported metrics are their means."""
    hits = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], bool)
    pos_len = np.array([2, 5, 1])
    reported, per_user = evaluation.topk_metrics_and_users(hits, pos_len, ks=(1, 3),
                                                           metrics=('recall', 'ndcg'))
    g2, g3 = 1 / math.log2(3), 0.5
    expected = {'recall@1': [0.5, 0.0, 0.0], 'recall@3': [1.0, 0.4, 0.0],
                'ndcg@1': [1.0, 0.0, 0.0],
                'ndcg@3': [(1 + g3) / (1 + g2), (g2 + g3) / (1 + g2 + g3), 0.0]}
    assert sorted(per_user) == sorted(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(per_user[key], values, rtol=1e-12, atol=0)
        assert reported[key] == round(float(np.mean(values)), 4)
    assert reported == evaluation.topk_metrics(hits, pos_len, ks=(1, 3),
                                               metrics=('recall', 'ndcg'))


# ----------------------------------------------------------------------------------------------
# 2. Against the slow reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('integer_embeddings', [False, True])
def test_evaluate_full_sort_matches_slow_reference(integer_embeddings):
    rng = np.random.default_rng(7 + integer_embeddings)
    n_users, n_items, d = 50, 80, 8
    if integer_embeddings:
        # Small integers: float32 scores are exact and ties are frequent, so this exercises the
        # lower-index-first tie-break.
        user_emb = rng.integers(-2, 3, (n_users, d)).astype(np.float32)
        item_emb = rng.integers(-2, 3, (n_items, d)).astype(np.float32)
    else:
        user_emb = rng.normal(size=(n_users, d)).astype(np.float32)
        item_emb = rng.normal(size=(n_items, d)).astype(np.float32)
    # User 5 has 60 training items: only 20 unmasked items remain, so masked (-1e10) items fill
    # ranks 21..50 of its list.
    tr_u, tr_i, te_u, te_i = random_splits(rng, n_users, n_items, heavy_user=5, heavy_count=60)
    assert 5 in te_u
    split = evaluation.build_eval_split(te_u, te_i, tr_u, tr_i)

    eval_users, rankings = slow_rankings(user_emb, item_emb, te_u, te_i, tr_u, tr_i, k=50)
    assert split.users.tolist() == eval_users
    assert split.n_eval > 2 * 16  # batch_size 16 below: at least 3 batches, last one padded
    assert split.n_eval % 16 != 0

    topk = evaluation.full_sort_topk(user_emb, item_emb, split, k=50, batch_size=16)
    np.testing.assert_array_equal(topk, np.array(rankings))

    got = evaluation.evaluate_full_sort(user_emb, item_emb, split, batch_size=16)
    want = slow_metrics(eval_users, rankings, te_u, te_i, METRICS, KS)
    assert list(got) == list(want)
    for key in want:
        assert got[key] == round(want[key], 4), key


def test_pos_len_counts_duplicate_rows():
    split = evaluation.build_eval_split(np.array([3, 1, 3, 3]), np.array([2, 0, 2, 4]),
                                        np.array([1, 3]), np.array([1, 1]))
    assert split.users.tolist() == [3, 1]  # first appearance, not id order
    assert split.pos_len.tolist() == [3, 1]
    # User 3 ranks items 2 and 4 first: (2 hits of 3 rows); recall@2 = (2/3 + 0)/2.
    user_emb = np.zeros((4, 1), np.float32)
    user_emb[3] = 1.0
    item_emb = np.array([[0.], [0.], [5.], [0.], [4.]], np.float32)
    got = evaluation.evaluate_full_sort(user_emb, item_emb, split, metrics=('recall',), ks=(2,))
    # User 1: all scores 0, item 1 masked -> ranks 0, 2: hit on item 0 -> recall 1/1.
    assert got == {'recall@2': round((2 / 3 + 1) / 2, 4)}


# ----------------------------------------------------------------------------------------------
# 3. Masking
# ----------------------------------------------------------------------------------------------

def test_best_training_item_is_masked():
    n_items = 12
    user_emb = np.array([[1.0], [1.0]], np.float32)
    item_emb = np.arange(n_items, dtype=np.float32)[:, None]  # item 11 scores highest
    split = evaluation.build_eval_split(np.array([0, 1]), np.array([3, 3]),
                                        np.array([0, 0, 1]), np.array([11, 9, 2]))
    topk = evaluation.full_sort_topk(user_emb, item_emb, split, k=5)
    assert 11 not in topk[0] and 9 not in topk[0]
    np.testing.assert_array_equal(topk[0], [10, 8, 7, 6, 5])
    np.testing.assert_array_equal(topk[1], [11, 10, 9, 8, 7])  # user 1's mask is its own


def test_masked_items_fill_short_lists_in_index_order():
    # 6 items, 4 of them training items of the user: with k = 5 the reference ranks the
    # unmasked items, with masked items (all exactly -1e10) in between by lower index. Item 5
    # scores -3e10, below the -1e10 mask, so it comes after the masked items; with -inf as the
    # mask it would come before them.
    user_emb = np.array([[1.0]], np.float32)
    item_emb = np.array([[5.], [4.], [3.], [2.], [1.], [-3e10]], np.float32)
    split = evaluation.build_eval_split(np.array([0]), np.array([5]),
                                        np.array([0, 0, 0, 0]), np.array([0, 2, 3, 1]))
    topk = evaluation.full_sort_topk(user_emb, item_emb, split, k=5)
    np.testing.assert_array_equal(topk[0], [4, 0, 1, 2, 3])


# ----------------------------------------------------------------------------------------------
# 4. Rounding and keys
# ----------------------------------------------------------------------------------------------

def test_rounding_and_key_names():
    rng = np.random.default_rng(0)
    hits = rng.random((7, 50)) < 0.3
    pos_len = rng.integers(1, 60, 7)
    got = evaluation.topk_metrics(hits, pos_len, metrics=('Recall', 'NDCG', 'Precision', 'MAP'))
    assert list(got) == [f'{m}@{k}' for m in METRICS for k in KS]
    for value in got.values():
        assert isinstance(value, float)
        assert value == round(value, 4)
    # precision@k has an exact formula: mean hit count / k, rounded.
    for k in KS:
        assert got[f'precision@{k}'] == round(hits[:, :k].sum() / (7 * k), 4)
    # 1/3 and 2/3 round to 4 decimals.
    one_third = evaluation.topk_metrics(np.array([[1], [0], [0]], bool), np.ones(3, int),
                                        metrics=('recall',), ks=(1,))
    assert one_third == {'recall@1': 0.3333}
    two_thirds = evaluation.topk_metrics(np.array([[1], [1], [0]], bool), np.ones(3, int),
                                         metrics=('precision',), ks=(1,))
    assert two_thirds == {'precision@1': 0.6667}


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match='unknown metric'):
        evaluation.topk_metrics(np.ones((1, 5), bool), np.ones(1), metrics=('auc',), ks=(5,))
    with pytest.raises(ValueError, match='cutoffs'):
        evaluation.topk_metrics(np.ones((1, 5), bool), np.ones(1), ks=(10,))
    split = evaluation.build_eval_split(np.array([0]), np.array([0]), np.array([0]), np.array([1]))
    with pytest.raises(ValueError, match='n_items'):
        evaluation.full_sort_topk(np.ones((1, 2)), np.ones((3, 2)), split, k=50)


# ----------------------------------------------------------------------------------------------
# 5. Popularity baseline
# ----------------------------------------------------------------------------------------------

def test_evaluate_popularity_hand_example():
    train_u = np.array([0, 0, 1, 1, 2, 2])
    train_i = np.array([0, 1, 1, 2, 1, 3])
    # Counts: item0 1, item1 3, item2 1, item3 1, item4 0, item5 0.
    np.testing.assert_array_equal(evaluation.popularity_scores(train_i, 6), [1, 3, 1, 1, 0, 0])
    # Global ranking (ties by lower index): 1, 0, 2, 3, 4, 5.
    split = evaluation.build_eval_split(np.array([1, 0, 2, 0]), np.array([0, 2, 5, 4]),
                                        train_u, train_i)
    # Evaluated order u1, u0, u2.
    # u1 masks {1,2}: top3 0,3,4; truth {0}   -> hits [1,0,0], pos 1.
    # u0 masks {0,1}: top3 2,3,4; truth {2,4} -> hits [1,0,1], pos 2.
    # u2 masks {1,3}: top3 0,2,4; truth {5}   -> hits [0,0,0], pos 1.
    got = evaluation.evaluate_popularity(train_i, 6, split, ks=(1, 2, 3))
    expected = {
        # recall: u1 1,1,1; u0 1/2,1/2,1; u2 0 -> 0.5, 0.5, 0.66667.
        'recall@1': 0.5, 'recall@2': 0.5, 'recall@3': 0.6667,
        # ndcg: u1 1,1,1; u0 1, 1/(1+g2) = 0.613147, (1+g3)/(1+g2) = 0.919721.
        # -> 0.66667, 0.537716, 0.639907.
        'ndcg@1': 0.6667, 'ndcg@2': 0.5377, 'ndcg@3': 0.6399,
        # precision: u1 1,1/2,1/3; u0 1,1/2,2/3 -> 0.66667, 0.33333, 0.33333.
        'precision@1': 0.6667, 'precision@2': 0.3333, 'precision@3': 0.3333,
        # map: u1 1,1,1; u0 1, 1/2, (1+2/3)/2 = 0.83333 -> 0.66667, 0.5, 0.61111.
        'map@1': 0.6667, 'map@2': 0.5, 'map@3': 0.6111,
    }
    assert got == expected


# ----------------------------------------------------------------------------------------------
# 6. One compilation per split
# ----------------------------------------------------------------------------------------------

def test_batch_function_traced_once_per_split(monkeypatch):
    chex.clear_trace_counter()
    counted = chex.assert_max_traces(evaluation._topk_batch, n=1)
    monkeypatch.setattr(evaluation, '_topk_batch', counted)
    evaluation._sharded_topk.cache_clear()  # compiled ranking functions trace `_topk_batch`

    rng = np.random.default_rng(3)
    n_users, n_items = 45, 60
    # Uneven training counts make the per-batch number of mask pairs differ between batches.
    tr_u, tr_i, te_u, te_i = random_splits(rng, n_users, n_items, heavy_user=2, heavy_count=40)
    split = evaluation.build_eval_split(te_u, te_i, tr_u, tr_i)
    rows, _ = evaluation._batched_mask_pairs(split, 8)
    assert rows.shape[0] >= 3
    assert len({int((r < 8).sum()) for r in rows}) > 1  # different real lengths, one padded shape

    user_emb = rng.normal(size=(n_users, 4)).astype(np.float32)
    item_emb = rng.normal(size=(n_items, 4)).astype(np.float32)
    first = evaluation.full_sort_topk(user_emb, item_emb, split, k=10, batch_size=8)
    again = evaluation.full_sort_topk(user_emb * 2, item_emb, split, k=10, batch_size=8)
    np.testing.assert_array_equal(first, again)  # scaling users does not change rankings

    # The counter is live: a differently shaped batch would be a second trace.
    with pytest.raises(AssertionError):
        evaluation.full_sort_topk(user_emb, item_emb, split, k=10, batch_size=5)
    chex.clear_trace_counter()
    evaluation._sharded_topk.cache_clear()


# ----------------------------------------------------------------------------------------------
# Hits and table
# ----------------------------------------------------------------------------------------------

def test_hit_matrix_matches_loop():
    rng = np.random.default_rng(11)
    tr_u, tr_i, te_u, te_i = random_splits(rng, 30, 40, heavy_user=0, heavy_count=10)
    split = evaluation.build_eval_split(te_u, te_i, tr_u, tr_i)
    topk = rng.integers(0, 40, (split.n_eval, 15))
    got = evaluation.hit_matrix(topk, split)
    for row, u in enumerate(split.users):
        truth = set(te_i[te_u == u].tolist())
        assert got[row].tolist() == [int(i) in truth for i in topk[row]]


def test_shared_ranking_gives_each_splits_own_metrics():
    """One ranking of the union of valid's and test's users equals ranking each split alone
    (against the slow reference), with user sets that only partly overlap and differ in order."""
    rng = np.random.default_rng(11)
    n_users, n_items, d = 40, 70, 6
    user_emb = rng.integers(-2, 3, (n_users, d)).astype(np.float32)  # ties: tie-break checked
    item_emb = rng.integers(-2, 3, (n_items, d)).astype(np.float32)
    tr_u, tr_i, va_u, va_i = random_splits(rng, n_users, n_items, heavy_user=3, heavy_count=50)
    _, _, te_u, te_i = random_splits(rng, n_users, n_items, heavy_user=3, heavy_count=50)
    va_keep, te_keep = va_u < 30, te_u >= 10  # valid: users 0..29, test: users 10..39, in different row orders
    va_u, va_i, te_u, te_i = va_u[va_keep], va_i[va_keep], te_u[te_keep], te_i[te_keep]
    valid = evaluation.build_eval_split(va_u, va_i, tr_u, tr_i)
    test = evaluation.build_eval_split(te_u, te_i, tr_u, tr_i)
    assert valid.users.tolist() != test.users.tolist()
    assert set(valid.users) & set(test.users) and set(valid.users) ^ set(test.users)
    shared = evaluation.build_shared_ranking((va_u, te_u), (va_i, te_i), tr_u, tr_i)
    assert shared.ranked.n_eval == len(set(valid.users) | set(test.users))

    got = evaluation.evaluate_shared(user_emb, item_emb, shared, (valid, test), batch_size=7)
    for split, split_u, split_i, metrics in ((valid, va_u, va_i, got[0]),
                                             (test, te_u, te_i, got[1])):
        eval_users, rankings = slow_rankings(user_emb, item_emb, split_u, split_i, tr_u, tr_i,
                                             k=50)
        topk = evaluation.full_sort_topk(user_emb, item_emb, shared.ranked, k=50, batch_size=7)
        np.testing.assert_array_equal(topk[shared.rows[0 if split is valid else 1]],
                                      np.array(rankings))
        want = slow_metrics(eval_users, rankings, split_u, split_i, METRICS, KS)
        assert metrics == {key: round(value, 4) for key, value in want.items()}
        assert metrics == evaluation.evaluate_full_sort(user_emb, item_emb, split, batch_size=7)
    with pytest.raises(ValueError, match='3 splits for a ranking built from 2'):
        evaluation.evaluate_shared(user_emb, item_emb, shared, (valid, test, valid))


# ----------------------------------------------------------------------------------------------
# Scanning items in a chosen order gives lax.top_k's result on the original order
# ----------------------------------------------------------------------------------------------

def _ordered_and_exact(user_emb, item_emb, order, rows=None, cols=None, k=2):
    users = np.arange(user_emb.shape[0], dtype=np.int32)
    rows = np.full(1, users.size, np.int32) if rows is None else np.asarray(rows, np.int32)
    cols = np.zeros(1, np.int32) if cols is None else np.asarray(cols, np.int32)
    ordered = evaluation._topk_batch(user_emb, item_emb, np.asarray(order, np.int32), users,
                                     rows, cols, k=k)
    exact = evaluation._topk_batch(user_emb, item_emb, None, users, rows, cols, k=k)
    return np.asarray(ordered), np.asarray(exact)


def test_a_tie_across_the_cut_is_recomputed_in_the_original_order():
    # Scores 5, 1, 1, 0: items 1 and 2 tie for the 2nd place; lax.top_k keeps the lower id.
    user_emb, item_emb = np.ones((1, 1), np.float32), np.array([[5.], [1.], [1.], [0.]],
                                                               np.float32)
    order = [0, 2, 1, 3]  # item 2 is scanned before item 1
    permuted_scan = jax.lax.top_k(jax.numpy.asarray(item_emb[order, 0])[None], 2)[1]
    assert np.asarray(permuted_scan).tolist() == [[0, 1]]  # i.e. items 0 and 2: the wrong pick
    ordered, exact = _ordered_and_exact(user_emb, item_emb, order)
    assert exact.tolist() == [[0, 1]] and ordered.tolist() == [[0, 1]]


def test_ties_inside_the_top_k_are_ordered_by_item_id():
    user_emb, item_emb = np.ones((1, 1), np.float32), np.array([[1.], [3.], [3.], [0.]],
                                                               np.float32)
    ordered, exact = _ordered_and_exact(user_emb, item_emb, [2, 1, 0, 3])
    assert exact.tolist() == [[1, 2]] and ordered.tolist() == [[1, 2]]


@pytest.mark.parametrize('integer_embeddings', [False, True])
def test_any_item_order_gives_the_exact_top_k(integer_embeddings):
    rng = np.random.default_rng(21 + integer_embeddings)
    n_users, n_items, d = 24, 90, 5
    if integer_embeddings:  # frequent ties, also across the cut
        user_emb = rng.integers(-1, 2, (n_users, d)).astype(np.float32)
        item_emb = rng.integers(-1, 2, (n_items, d)).astype(np.float32)
    else:
        user_emb = rng.normal(size=(n_users, d)).astype(np.float32)
        item_emb = rng.normal(size=(n_items, d)).astype(np.float32)
    # User 3 has all but 12 items masked: masked (-1e10, tied) items fill its list.
    rows = np.concatenate([np.full(n_items - 12, 3), rng.integers(0, n_users, 60)])
    cols = np.concatenate([np.arange(12, n_items), rng.integers(0, n_items, 60)])
    best_first = np.asarray(evaluation.item_order(user_emb, item_emb))
    for order in (best_first, best_first[::-1], rng.permutation(n_items)):
        ordered, exact = _ordered_and_exact(user_emb, item_emb, order, rows, cols, k=20)
        np.testing.assert_array_equal(ordered, exact)
    assert sorted(best_first.tolist()) == list(range(n_items))


# ----------------------------------------------------------------------------------------------
# Recall denominator option and a model's own score function
# ----------------------------------------------------------------------------------------------

def test_recall_with_min_k_denominator_hand_computed():
    # The hits of test_topk_metrics_hand_computed; Recall@k divides by min(k, pos_len).
    # A (pos 2): @1 1/min(1,2) = 1; @2 1/2; @3 2/2 = 1.
    # B (pos 5): @1 0/1 = 0; @2 1/2; @3 2/3.
    # C (pos 1): 0, 0, 0.
    # -> @1 1/3 = 0.3333; @2 1/3 = 0.3333; @3 (1 + 2/3)/3 = 0.5556.
    hits = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], bool)
    pos_len = np.array([2, 5, 1])
    got = evaluation.topk_metrics(hits, pos_len, metrics=('recall', 'ndcg'), ks=(1, 2, 3),
                                  recall_denominator='min_k_test_items')
    assert {k: v for k, v in got.items() if k.startswith('recall')} == {
        'recall@1': 0.3333, 'recall@2': 0.3333, 'recall@3': 0.5556}
    # NDCG is not affected by the option.
    assert {k: v for k, v in got.items() if k.startswith('ndcg')} == {
        'ndcg@1': 0.3333, 'ndcg@2': 0.3333, 'ndcg@3': 0.4835}
    # The default is MMRec's hits / pos_len (different numbers at @2 and @3).
    default = evaluation.topk_metrics(hits, pos_len, metrics=('recall',), ks=(1, 2, 3))
    assert default == {'recall@1': 0.1667, 'recall@2': 0.2333, 'recall@3': 0.4667}
    with pytest.raises(ValueError, match='eval.recall_denominator'):
        evaluation.topk_metrics(hits, pos_len, ks=(1,), recall_denominator='min_k')


def _neg_sq_distance(users, items):
    """A score that is not a dot product: -||u - i||^2 of user rows (b, d) and item table."""
    u, i = users['points'], items['points']
    return -jax.numpy.sum((u[:, None, :] - i[None, :, :]) ** 2, axis=-1)


def test_a_models_own_score_ranks_by_it():
    # Users and items are points on a line (pytrees, as a model's own score may read); the
    # score is minus the squared distance, so each user ranks items by closeness, which no
    # dot product of these 1-d points does (a dot product ranks by the item coordinate alone).
    users = {'points': np.array([[0.0], [2.9], [10.0]], np.float32)}
    items = {'points': np.array([[0.0], [1.0], [2.0], [3.0], [4.0]], np.float32)}
    split = evaluation.build_eval_split(np.array([0, 1, 2]), np.array([1, 2, 4]),
                                        np.array([0, 1]), np.array([0, 3]))
    topk = evaluation.full_sort_topk(users, items, split, k=3, score=_neg_sq_distance)
    # u0 at 0 (item 0 masked): 1, 2, 3. u1 at 2.9 (item 3 masked): 2 (0.81), 4 (1.21), 1.
    # u2 at 10: 4, 3, 2.
    np.testing.assert_array_equal(topk, [[1, 2, 3], [2, 4, 1], [4, 3, 2]])
    got = evaluation.evaluate_full_sort(users, items, split, metrics=('recall',), ks=(1, 2),
                                        score=_neg_sq_distance)
    # Hits: u0 [1,0] (truth 1), u1 [1,0] (truth 2), u2 [1,0] (truth 4) -> recall@1 = @2 = 1.
    assert got == {'recall@1': 1.0, 'recall@2': 1.0}
    dot = evaluation.full_sort_topk(users['points'], items['points'], split, k=3)
    assert not np.array_equal(dot, topk)  # the dot product ranks differently
