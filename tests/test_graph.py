"""Graphs: hand-built cases whose answers can be worked out on paper, and invariants."""
import jax
import numpy as np
import pytest

from lirdrec_jax import graph


def dense(bcoo):
    return np.asarray(bcoo.todense())


def test_norm_adjacency_on_paper_graph():
    # 2 users, 3 items: u0-i0, u0-i1, u1-i1 (u1-i1 listed twice: counts once).
    # Degrees: u0=2, u1=1, i0=1, i1=2, i2=0. Entry (u0, i0) = 1/sqrt(2*1), (u0, i1) = 1/2,
    # (u1, i1) = 1/sqrt(1*2).
    users = np.array([0, 0, 1, 1])
    items = np.array([0, 1, 1, 1])
    a = dense(graph.norm_adjacency(users, items, 2, 3))
    expected = np.zeros((5, 5))
    for u, i, v in [(0, 0, 1 / np.sqrt(2)), (0, 1, 0.5), (1, 1, 1 / np.sqrt(2))]:
        expected[u, 2 + i] = expected[2 + i, u] = v
    np.testing.assert_allclose(a, expected, rtol=1e-6)


def test_norm_adjacency_is_symmetric_with_unit_spectral_radius():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 200), rng.integers(0, 20, 200)
    a = dense(graph.norm_adjacency(users, items, 30, 20))
    np.testing.assert_allclose(a, a.T, atol=0)
    # D^-1/2 A D^-1/2 of a graph without isolated-node issues has largest eigenvalue 1.
    assert np.max(np.abs(np.linalg.eigvalsh(a.astype(np.float64)))) == pytest.approx(1.0, abs=1e-5)


def test_knn_rows_have_k_entries_self_included_and_value_one_over_k():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((40, 8)).astype(np.float32)
    s = graph.knn_graph_scipy(feats, 5).toarray()
    assert ((s > 0).sum(axis=1) == 5).all()
    assert (np.diag(s) > 0).all()  # the most similar row to itself is itself
    np.testing.assert_allclose(s[s > 0], 1 / (5 + 1e-7))
    # Neighbours are the top-5 cosine similarities.
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = unit @ unit.T
    for row in range(40):
        np.testing.assert_array_equal(np.sort(np.flatnonzero(s[row])),
                                      np.sort(np.argsort(-sim[row])[:5]))


def test_knn_item_graph_mixes_modalities_by_weight():
    rng = np.random.default_rng(2)
    img, txt = rng.random((30, 6)), rng.random((30, 4))
    mixed = dense(graph.knn_item_graph([img, txt], [0.2, 0.8], 3))
    expected = 0.2 * graph.knn_graph_scipy(img, 3).toarray() + 0.8 * graph.knn_graph_scipy(txt, 3).toarray()
    np.testing.assert_allclose(mixed, expected, rtol=1e-6)
    np.testing.assert_allclose(mixed.sum(axis=1), np.ones(30), rtol=1e-5)


def test_edge_dropout_keeps_count_and_renormalises():
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 50, 400), rng.integers(0, 40, 400)
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    edges = graph.train_edges(pairs[:, 0], pairs[:, 1], 50, 40)
    keep = int(len(pairs) * 0.7)
    a = graph.edge_dropout_adjacency(jax.random.PRNGKey(0), edges, keep, 50, 40)
    d = dense(a)
    assert a.nse == 2 * keep
    assert (d > 0).sum() == 2 * keep  # kept edges are distinct (sampling without replacement)
    np.testing.assert_allclose(d, d.T)
    # Every kept edge is a training edge, valued 1/sqrt(kept-degree products).
    kept = np.argwhere(d[:50, 50:] > 0)
    assert set(map(tuple, kept)) <= set(map(tuple, pairs))
    du, di = (d[:50, 50:] > 0).sum(1), (d[:50, 50:] > 0).sum(0)
    for u, i in kept:
        assert d[u, 50 + i] == pytest.approx(1 / np.sqrt(du[u] * di[i]), rel=1e-5)


def test_edge_dropout_prefers_heavy_edges():
    # One heavy edge (weight 1) among light ones: drawn far more often than a light edge.
    users = np.array([0] + list(range(1, 21)) * 1)
    items = np.array([0] + [1] * 20)
    edges = graph.train_edges(users, items, 21, 2)  # edge 0: degrees 1,1 -> weight 1; others 1/sqrt(20)
    hits = np.zeros(21)
    for s in range(300):
        a = graph.edge_dropout_adjacency(jax.random.PRNGKey(s), edges, 1, 21, 2)
        kept_user = int(np.asarray(a.indices)[0, 0])
        hits[kept_user] += 1
    # P(edge 0) = 1 / (1 + 20/sqrt(20)) = 0.183; a light edge: 0.041.
    assert hits[0] / 300 == pytest.approx(0.183, abs=0.06)
    assert hits[1:].mean() / 300 == pytest.approx(0.041, abs=0.02)


def test_spmm_matches_dense_product():
    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 10, 30), rng.integers(0, 8, 30)
    a = graph.norm_adjacency(users, items, 10, 8)
    x = rng.standard_normal((18, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(graph.spmm(a, x)), dense(a) @ x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The chunked sparse product ('segment_sum') against BCOO
# ----------------------------------------------------------------------------------------------

def _graphs_to_compare():
    rng = np.random.default_rng(5)
    users, items = rng.integers(0, 40, 300), rng.integers(0, 25, 300)
    edges = graph.train_edges(users, items, 40, 25)
    return {
        'user-item (sorted, symmetric)': graph.norm_adjacency(users, items, 40, 25),
        'kNN (not symmetric)': graph.knn_item_graph([rng.random((25, 6)), rng.random((25, 4))],
                                                   [0.3, 0.7], 4),
        'edge dropout (unsorted)': graph.edge_dropout_adjacency(jax.random.PRNGKey(0), edges,
                                                               200, 40, 25),
    }


@pytest.mark.parametrize('chunk', [0, 5, 64, 10_000])
def test_chunked_product_and_gradient_are_bit_identical_to_bcoo(chunk):
    for name, adj in _graphs_to_compare().items():
        x = jax.random.normal(jax.random.PRNGKey(1), (adj.shape[1], 6))
        chunked = graph.to_chunked(adj, chunk)
        # Two products (all three matrices are square), so the gradient runs both directions.
        loss = lambda m: jax.jit(jax.grad(
            lambda x: jax.numpy.sum(jax.numpy.sin(graph.spmm(m, graph.spmm(m, x))))))
        np.testing.assert_array_equal(graph.spmm(chunked, x), graph.spmm(adj, x), err_msg=name)
        np.testing.assert_array_equal(loss(chunked)(x), loss(adj)(x), err_msg=name)


def test_chunked_layout_pads_with_dropped_entries():
    adj = graph.norm_adjacency(np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 2)  # 6 entries
    c = graph.to_chunked(adj, 4)
    assert c.rows.shape == (2, 4) and c.shape == (4, 4)
    assert (c.rows[1, 2:] == 4).all() and (c.cols[1, 2:] == 4).all() and (c.values[1, 2:] == 0).all()
    # The transpose's entries are sorted by column of the matrix.
    assert (np.diff(np.asarray(c.rows_t).ravel()[:6]) >= 0).all()
    dense = np.asarray(adj.todense())
    np.testing.assert_array_equal(graph.spmm(c, np.eye(4, dtype=np.float32)), dense)


def test_unknown_spmm_impl_names_the_field():
    adj = graph.norm_adjacency(np.array([0]), np.array([0]), 1, 1)
    with pytest.raises(ValueError, match="graph.spmm_impl = 'csr'"):
        graph.spmm_operand(adj, 'csr', 0)


def test_reused_knn_searches_give_the_same_graphs(monkeypatch):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 6)).astype(np.float32)
    plain = graph.knn_graph_scipy(feats, 4)
    plain_cos = graph.cosine_knn(feats, 5)
    calls = []
    search = graph._search_knn_indices

    def counted(f, k, block_rows):
        calls.append(k)
        return search(f, k, block_rows)

    monkeypatch.setattr(graph, '_search_knn_indices', counted)
    with graph.reusing_knn_searches():
        first = graph.knn_graph_scipy(feats, 4)
        again = graph.knn_graph_scipy(feats.copy(), 4)  # equal bytes, another array
        other = graph.knn_graph_scipy(feats, 3)
        changed = feats.copy()
        changed[3, 2] += 1.0
        graph.knn_graph_scipy(changed, 4)
        cos = graph.cosine_knn(feats, 5), graph.cosine_knn(feats, 5)
    assert calls == [4, 3, 4]  # equal features and k: searched once
    graph.knn_graph_scipy(feats, 4)
    assert calls == [4, 3, 4, 4]  # outside the block: searched again
    for g in (first, again):
        assert (g != plain).nnz == 0
    assert other.nnz == 30 * 3
    for values, indices in cos:
        np.testing.assert_array_equal(values, plain_cos[0])
        np.testing.assert_array_equal(indices, plain_cos[1])
