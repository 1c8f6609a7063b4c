"""Graphs of the model: the normalised user-item adjacency and the frozen item-item kNN graph.

This is the only module that imports `jax.experimental.sparse`. Every sparse-dense product of
the models goes through `spmm`, so a faster kernel can replace it in one place.

Node numbering follows the reference: users are nodes 0..n_users-1, items are nodes
n_users..n_users+n_items-1.
"""
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

# The reference adds this to every degree before the inverse square root, so isolated nodes
# get a huge-but-finite factor instead of a division by zero (their rows are empty anyway).
DEGREE_EPSILON = 1e-7


def spmm(adj: jsparse.BCOO, x: jax.Array) -> jax.Array:
    """Sparse (n, m) times dense (m, d) -> dense (n, d). The one sparse product of the project."""
    return adj @ x


def _to_bcoo(matrix: sp.spmatrix) -> jsparse.BCOO:
    coo = matrix.tocoo()
    indices = np.stack([coo.row, coo.col], axis=1).astype(np.int32)
    return jsparse.BCOO((jnp.asarray(coo.data, jnp.float32), jnp.asarray(indices)),
                        shape=coo.shape)


def norm_adjacency_scipy(train_users: np.ndarray, train_items: np.ndarray,
                         n_users: int, n_items: int) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 of the symmetric, binary user-item graph, in float64.

    Args:
      train_users, train_items: (n,) training interactions. Repeated pairs count once, as in the
        reference (it builds A from a dict keyed by (row, col)).
      n_users, n_items: node counts.

    Returns:
      (n_users+n_items, n_users+n_items) CSR matrix, sorted indices, no explicit zeros.
    """
    n_nodes = n_users + n_items
    rows = np.concatenate([train_users, train_items + n_users]).astype(np.int64)
    cols = np.concatenate([train_items + n_users, train_users]).astype(np.int64)
    adj = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n_nodes, n_nodes))
    adj.data[:] = 1.0  # binary: duplicates summed by the constructor are set back to one
    degree = np.asarray(adj.sum(axis=1)).ravel() + DEGREE_EPSILON
    inv_sqrt = sp.diags(degree ** -0.5)
    out = (inv_sqrt @ adj @ inv_sqrt).tocsr()
    out.sort_indices()
    return out


def norm_adjacency(train_users: np.ndarray, train_items: np.ndarray,
                   n_users: int, n_items: int) -> jsparse.BCOO:
    """The normalised adjacency as a float32 BCOO matrix (see `norm_adjacency_scipy`)."""
    return _to_bcoo(norm_adjacency_scipy(train_users, train_items, n_users, n_items))


class TrainEdges(NamedTuple):
    """Training edges for degree-sensitive edge dropout.

    Attributes:
      users: (n_edges,) int32 user ids, one entry per training row (repeats kept, as the
        reference builds them from the COO interaction matrix).
      items: (n_edges,) int32 item ids.
      weights: (n_edges,) float32 1/sqrt(d_u d_i), the sampling weights.
    """
    users: jax.Array
    items: jax.Array
    weights: jax.Array


def bipartite_edge_values(users: jax.Array, items: jax.Array, n_users: int,
                          n_items: int) -> jax.Array:
    """1/sqrt((deg_u+eps)(deg_i+eps)) for each edge, degrees counted over the given edges."""
    ones = jnp.ones(users.shape, jnp.float32)
    user_degree = jax.ops.segment_sum(ones, users, n_users) + DEGREE_EPSILON
    item_degree = jax.ops.segment_sum(ones, items, n_items) + DEGREE_EPSILON
    return jax.lax.rsqrt(user_degree)[users] * jax.lax.rsqrt(item_degree)[items]


def train_edges(train_users: np.ndarray, train_items: np.ndarray, n_users: int,
                n_items: int) -> TrainEdges:
    users = jnp.asarray(train_users, jnp.int32)
    items = jnp.asarray(train_items, jnp.int32)
    return TrainEdges(users, items, bipartite_edge_values(users, items, n_users, n_items))


def edge_dropout_adjacency(key: jax.Array, edges: TrainEdges, keep_count: int,
                           n_users: int, n_items: int) -> jsparse.BCOO:
    """Degree-sensitive edge dropout: a new normalised adjacency from a weighted edge sample.

    The reference draws `keep_count` edges without replacement with probability proportional
    to `edges.weights` (torch.multinomial), re-normalises the kept edges by their own degrees
    and mirrors them. Adding Gumbel noise to the log-weights and taking the top `keep_count` is
    the same distribution as successive sampling without replacement, in one vectorised step.

    Returns:
      (n_users+n_items, n_users+n_items) BCOO with exactly 2*keep_count stored entries (fixed
      shape, so the training step never recompiles).
    """
    gumbel = jax.random.gumbel(key, edges.weights.shape)
    _, kept = jax.lax.top_k(jnp.log(edges.weights) + gumbel, keep_count)
    users, items = edges.users[kept], edges.items[kept]
    values = bipartite_edge_values(users, items, n_users, n_items)
    item_nodes = items + n_users
    rows = jnp.concatenate([users, item_nodes])
    cols = jnp.concatenate([item_nodes, users])
    indices = jnp.stack([rows, cols], axis=1)
    n_nodes = n_users + n_items
    return jsparse.BCOO((jnp.concatenate([values, values]), indices), shape=(n_nodes, n_nodes))


def _knn_indices(features: np.ndarray, k: int, block_rows: int = 2048) -> np.ndarray:
    """Top-k cosine neighbours of every row (the row itself included), computed in row blocks.

    Ties are broken towards the lower item index (jax.lax.top_k); torch.topk leaves the order of
    ties unspecified, which is why the parity tool can import the reference's graph.

    Returns:
      (n, k) int32 neighbour indices.
    """
    x = jnp.asarray(features, jnp.float32)
    unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    out = []
    for start in range(0, unit.shape[0], block_rows):
        out.append(np.asarray(_block_topk(unit[start:start + block_rows], unit, k)))
    return np.concatenate(out, axis=0).astype(np.int32)


@functools.partial(jax.jit, static_argnums=2)
def _block_topk(rows: jax.Array, unit: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(rows @ unit.T, k)[1]


def knn_graph_scipy(features: np.ndarray, k: int) -> sp.csr_matrix:
    """Binary top-k cosine graph, normalised as the reference does: value (i, j) is
    1/sqrt(r_i r_j) with r the row sums (+1e-7). Every row holds k entries, so all values are
    1/(k+1e-7); the general formula is kept so that imported graphs normalise the same way.
    """
    n = features.shape[0]
    if k > n:
        raise ValueError(f'knn_k={k} is larger than the number of items ({n})')
    neighbours = _knn_indices(features, k)
    rows = np.repeat(np.arange(n), k)
    cols = neighbours.ravel()
    row_sum = np.bincount(rows, minlength=n).astype(np.float64) + DEGREE_EPSILON
    values = row_sum[rows] ** -0.5 * row_sum[cols] ** -0.5
    return sp.csr_matrix((values, (rows, cols)), shape=(n, n))


def knn_item_graph_scipy(features: Sequence[np.ndarray], weights: Sequence[float],
                         k: int) -> sp.csr_matrix:
    """The frozen item-item graph S = sum_m weight_m * kNN_m (float64 CSR, duplicates summed)."""
    if len(features) != len(weights):
        raise ValueError('one weight per modality is needed')
    total = None
    for feat, weight in zip(features, weights):
        part = weight * knn_graph_scipy(feat, k)
        total = part if total is None else total + part
    total = total.tocsr()
    total.sum_duplicates()
    total.sort_indices()
    return total


def knn_item_graph(features: Sequence[np.ndarray], weights: Sequence[float],
                   k: int) -> jsparse.BCOO:
    """The frozen item-item graph as float32 BCOO (see `knn_item_graph_scipy`)."""
    return _to_bcoo(knn_item_graph_scipy(features, weights, k))


def modality_weights(has_image: bool, has_text: bool, mm_image_weight: float) -> list:
    """The reference's mixing: w*image + (1-w)*text with both, weight 1 for a single modality."""
    if has_image and has_text:
        return [mm_image_weight, 1.0 - mm_image_weight]
    return [1.0]
