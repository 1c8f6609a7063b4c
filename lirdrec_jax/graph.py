"""Graphs of the model: the normalised user-item adjacency and the frozen item-item kNN graph.

This is the only module that imports `jax.experimental.sparse`. Every sparse-dense product of
the models goes through `spmm`, so a faster kernel can replace it in one place.

Two implementations of the product, chosen per run by `graph.spmm_impl` (see `spmm_operand`):
- 'bcoo' (default): `jax.experimental.sparse.BCOO @ x`, a gather of x's rows, a multiply and
  a scatter-add over all stored entries at once.
- 'segment_sum': the same products summed in the same order, but over the entries in chunks
  of `chunk_size` (a `lax.scan`), with a custom gradient that runs the transposed product over
  column-sorted entries. On the CPU the one-shot product materialises an (nnz, d)
  intermediate (200 MB at Amazon-Baby scale) whose fresh pages cost more than the arithmetic,
  and the transposed product scatters to random rows; chunks of 4096 entries stay in cache and
  sorted targets keep the scatter local: 3-8x faster (docs/performance.md). A product on its
  own is bit-identical to BCOO's, forward and gradient (tested); inside the model XLA folds the
  following layer sum into BCOO's scatter (`total + A @ x` becomes a scatter into `total`),
  which it cannot do across the scan, so whole-model numbers differ at float32 rounding level.
  That is why 'bcoo' stays the default. `chunk_size=0` is one chunk.

Node numbering follows the reference: users are nodes 0..n_users-1, items are nodes
n_users..n_users+n_items-1.
"""
import contextlib
import dataclasses
import functools
import hashlib
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from lirdrec_jax import progress
from jax.experimental import sparse as jsparse

# The reference adds this to every degree before the inverse square root, so isolated nodes
# get a huge-but-finite factor instead of a division by zero (their rows are empty anyway).
DEGREE_EPSILON = 1e-7

SPMM_IMPLS = ('bcoo', 'segment_sum')


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['rows', 'cols', 'values', 'rows_t', 'cols_t', 'values_t'],
                   meta_fields=['shape'])
@dataclasses.dataclass(frozen=True)
class ChunkedCoo:
    """A sparse (n_rows, n_cols) matrix as COO entries cut into equal chunks, twice: in the
    order of the BCOO matrix it came from (for the product) and sorted by column (for the
    transposed product of the gradient).

    Attributes:
      rows, cols: (n_chunks, chunk) int32 row and column of each entry; n_rows / n_cols on
        padding entries.
      values: (n_chunks, chunk) float32 value of each entry; 0 on padding entries.
      rows_t, cols_t, values_t: the transpose's entries (rows_t = columns of the matrix),
        ordered by (column, original position); same padding.
      shape: (n_rows, n_cols), static.
    The products sum each output row's terms in the same order as BCOO's product and BCOO's
    transpose rule do (so a product alone is bit-identical to BCOO's); sorted targets make the
    scatter-adds of both directions cache-friendly.
    """
    rows: jax.Array
    cols: jax.Array
    values: jax.Array
    rows_t: jax.Array
    cols_t: jax.Array
    values_t: jax.Array
    shape: Tuple[int, int]


SparseMatrix = Union[jsparse.BCOO, ChunkedCoo]


def spmm(adj: SparseMatrix, x: jax.Array) -> jax.Array:
    """Sparse (n, m) times dense (m, d) -> dense (n, d). The one sparse product of the project."""
    if isinstance(adj, ChunkedCoo):
        return _chunked_spmm(adj.rows, adj.cols, adj.values, adj.rows_t, adj.cols_t,
                             adj.values_t, x, adj.shape[0])
    return adj @ x


def to_chunked(adj: jsparse.BCOO, chunk_size: int) -> ChunkedCoo:
    """The entries of a 2-D BCOO matrix, in stored order and sorted by column, padded to whole
    chunks. Works on host and traced arrays alike. `chunk_size=0` keeps all entries in one
    chunk."""
    n_rows, n_cols = adj.shape
    rows, cols, values = adj.indices[:, 0], adj.indices[:, 1], adj.data
    nnz = values.shape[0]
    chunk = max(1, nnz if chunk_size <= 0 else min(int(chunk_size), nnz))
    n_chunks = max(1, -(-nnz // chunk))
    pad = n_chunks * chunk - nnz
    shaped = lambda a, fill: jnp.concatenate(
        [a, jnp.full((pad,), fill, a.dtype)]).reshape(n_chunks, chunk)
    rows, cols = rows.astype(jnp.int32), cols.astype(jnp.int32)
    by_col = jnp.argsort(cols, stable=True)  # the transpose rule's order within each column
    return ChunkedCoo(shaped(rows, n_rows), shaped(cols, n_cols), shaped(values, 0),
                      shaped(cols[by_col], n_cols), shaped(rows[by_col], n_rows),
                      shaped(values[by_col], 0), (int(n_rows), int(n_cols)))


def spmm_operand(adj: jsparse.BCOO, impl: str, chunk_size: int) -> SparseMatrix:
    """`adj` in the representation of `impl` (one of SPMM_IMPLS)."""
    if impl == 'bcoo':
        return adj
    if impl == 'segment_sum':
        return to_chunked(adj, chunk_size)
    raise ValueError(f'config field graph.spmm_impl = {impl!r}; expected one of {SPMM_IMPLS}')


def to_operands(tree, impl: str, chunk_size: int):
    """`tree` with every BCOO matrix in it converted by `spmm_operand` (other leaves kept)."""
    return jax.tree.map(
        lambda x: spmm_operand(x, impl, chunk_size) if isinstance(x, jsparse.BCOO) else x,
        tree, is_leaf=lambda x: isinstance(x, jsparse.BCOO))


def _scatter_products(rows, cols, values, x, n_out):
    """sum over entries e of values[e] * x[cols[e]] into row rows[e], chunk by chunk, in order."""
    x = jnp.asarray(x)

    def body(acc, entry):
        r, c, v = entry
        gathered = x.at[c].get(mode='fill', fill_value=0)
        return acc.at[r].add(v[:, None].astype(x.dtype) * gathered, mode='drop'), None

    acc = jnp.zeros((n_out, x.shape[1]), x.dtype)
    if rows.shape[0] == 1:  # one chunk: no loop
        return body(acc, (rows[0], cols[0], values[0]))[0]
    return jax.lax.scan(body, acc, (rows, cols, values))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked_spmm(rows, cols, values, rows_t, cols_t, values_t, x, n_rows):
    return _scatter_products(rows, cols, values, x, n_rows)


def _chunked_spmm_fwd(rows, cols, values, rows_t, cols_t, values_t, x, n_rows):
    return (_scatter_products(rows, cols, values, x, n_rows),
            (rows_t, cols_t, values_t, x.shape[0]))


def _chunked_spmm_bwd(n_rows, residuals, g):
    # The transposed product over the column-sorted entries: each output row sums the same
    # terms in the same order as BCOO's transpose rule. The graphs are constants: no gradient
    # for their entries.
    rows_t, cols_t, values_t, n_cols = residuals
    del n_rows
    return (None,) * 6 + (_scatter_products(rows_t, cols_t, values_t, g, n_cols),)


_chunked_spmm.defvjp(_chunked_spmm_fwd, _chunked_spmm_bwd)


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
      users: (n_edges,) int32 user ids, one entry per distinct (user, item) training pair,
        sorted by (user, item): the reference's edge list is its COO interaction matrix after
        `astype(np.float32)`, which sums duplicates and sorts the entries.
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
    """The distinct training pairs, sorted by (user, item), and their sampling weights."""
    pairs = np.unique(np.asarray(train_users, np.int64) * n_items
                      + np.asarray(train_items, np.int64))
    users = jnp.asarray(pairs // n_items, jnp.int32)
    items = jnp.asarray(pairs % n_items, jnp.int32)
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


# The searches `reusing_knn_searches` has seen: {(search, shape, dtype, content hash, k, block):
# result}, or None outside such a block.
_knn_memo: Optional[dict] = None


@contextlib.contextmanager
def reusing_knn_searches():
    """Within the block, a neighbour search (`_knn_indices`, `cosine_knn`) over features equal
    to an earlier one's (the same bytes, shape and dtype) with the same k returns the earlier
    result instead of searching again. The searches are deterministic functions of their
    inputs, so every graph built from them is the one built without the block. For commands that
    build many models' graphs over the same tables (`lirdrec_jax.plans`: at Elec scale one
    search over the 4096-d image features takes minutes on a CPU). Blocks do not nest."""
    global _knn_memo
    if _knn_memo is not None:
        raise RuntimeError('reusing_knn_searches blocks do not nest')
    _knn_memo = {}
    try:
        yield
    finally:
        _knn_memo = None


def _reused(search: Callable, features, k: int, block_rows: int):
    """search(features, k, block_rows), or its earlier result within `reusing_knn_searches`."""
    if _knn_memo is None:
        return search(features, k, block_rows)
    a = np.ascontiguousarray(np.asarray(features))
    key = (search.__name__, a.shape, str(a.dtype),
           hashlib.blake2b(a.view(np.uint8), digest_size=16).hexdigest(), int(k), block_rows)
    if key not in _knn_memo:
        _knn_memo[key] = search(features, k, block_rows)
    return _knn_memo[key]


def _knn_indices(features: np.ndarray, k: int, block_rows: int = 2048) -> np.ndarray:
    """`_search_knn_indices`, reused within `reusing_knn_searches`."""
    return _reused(_search_knn_indices, features, k, block_rows)


def _search_knn_indices(features: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """Top-k cosine neighbours of every row (the row itself included), computed in row blocks.

    Ties are broken towards the lower item index (jax.lax.top_k); torch.topk leaves the order of
    ties unspecified, which is why the parity tool can import the reference's graph.

    Returns:
      (n, k) int32 neighbour indices.
    """
    x = jnp.asarray(features, jnp.float32)
    unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    out = []
    starts = range(0, unit.shape[0], block_rows)
    with progress.bar(len(starts), f'kNN graph (k={k})', unit='block') as blocks:
        for start in starts:
            out.append(np.asarray(_block_topk(unit[start:start + block_rows], unit, k)))
            blocks.update()
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


def modality_knn_graph(image, text, k: int, mm_image_weight: float) -> jsparse.BCOO:
    """The frozen kNN item graph of the modalities present (either table may be None):
    `mm_image_weight * kNN(image) + (1 - mm_image_weight) * kNN(text)`, or one modality's alone
    (`modality_weights`)."""
    feats = [f for f in (image, text) if f is not None]
    weights = modality_weights(image is not None, text is not None, mm_image_weight)
    return knn_item_graph(feats, weights, k)


def modality_weights(has_image: bool, has_text: bool, mm_image_weight: float) -> list:
    """The reference's mixing: w*image + (1-w)*text with both, weight 1 for a single modality."""
    if has_image and has_text:
        return [mm_image_weight, 1.0 - mm_image_weight]
    return [1.0]


# Entries of the (rows, n) similarity block that `cosine_knn` holds at once (128 MB of float32).
COSINE_BLOCK_ENTRIES = 1 << 25


def cosine_knn(features: np.ndarray, k: int, block_rows: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """`_search_cosine_knn`, reused within `reusing_knn_searches`."""
    return _reused(_search_cosine_knn, features, k, block_rows)


def _search_cosine_knn(features: np.ndarray, k: int, block_rows: int
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k cosine similarities of every row against all rows (itself included), in float32,
    in row blocks, so that only a (block_rows, n) slice of the similarity matrix exists at once.

    The rows are unit-normalised as x / ||x|| (a zero row gives NaN, as in the references).
    Ties go to the lower column index (jax.lax.top_k).

    Args:
      features: (n, d) rows.
      k: neighbours per row, at most n.
      block_rows: rows per block; 0 = as many as fit COSINE_BLOCK_ENTRIES.

    Returns:
      ((n, k) float32 similarities, largest first; (n, k) int32 column indices).
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f'k={k} neighbours requested from {n} rows; expected 1 <= k <= {n}')
    block = block_rows or max(1, min(n, COSINE_BLOCK_ENTRIES // max(n, 1)))
    x = jnp.asarray(features, jnp.float32)
    unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    values, indices = [], []
    starts = range(0, n, block)
    with progress.bar(len(starts), f'kNN graph (k={k})', unit='block') as blocks:
        for start in starts:
            v, i = _block_topk_values(unit[start:start + block], unit, k)
            values.append(np.asarray(v))
            indices.append(np.asarray(i))
            blocks.update()
    return np.concatenate(values), np.concatenate(indices).astype(np.int32)


@functools.partial(jax.jit, static_argnums=2)
def _block_topk_values(rows: jax.Array, unit: jax.Array, k: int) -> tuple:
    return jax.lax.top_k(rows @ unit.T, k)


def top_k_per_row(matrix: sp.spmatrix, k: int) -> sp.csr_matrix:
    """The k largest stored entries of every row of a sparse matrix (all of a row's entries
    when it has at most k); ties go to the lower column index. Stored zeros count as entries:
    eliminate them first if they must not.

    Returns:
      CSR of the same shape and dtype, sorted indices.
    """
    coo = sp.coo_matrix(matrix)
    coo.sum_duplicates()
    order = np.lexsort((coo.col, -coo.data, coo.row))  # by row, value descending, column
    rows, cols, data = coo.row[order], coo.col[order], coo.data[order]
    starts = np.searchsorted(rows, np.arange(coo.shape[0]))
    rank = np.arange(rows.size) - starts[rows]
    keep = rank < k
    out = sp.csr_matrix((data[keep], (rows[keep], cols[keep])), shape=coo.shape)
    out.sort_indices()
    return out


def sym_norm_by_row_sums(matrix: sp.spmatrix) -> sp.csr_matrix:
    """D^-1/2 M D^-1/2 with D the row sums of M (not symmetrised first), and 0 where a row sum
    is 0 (its inverse square root, inf, set to 0): LATTICE's dense 'sym' Laplacian
    normalisation, which its descendants use for item-item graphs. No epsilon is added (unlike
    `norm_adjacency`). Entries that become 0 (a column whose own row sums to 0) are dropped.

    Returns:
      float64 CSR, sorted indices.
    """
    m = sp.csr_matrix(matrix, dtype=np.float64)
    row_sum = np.asarray(m.sum(axis=1)).ravel()
    with np.errstate(divide='ignore'):
        inv_sqrt = np.power(row_sum, -0.5)
    inv_sqrt[np.isinf(inv_sqrt)] = 0.0
    scale = sp.diags(inv_sqrt)
    out = (scale @ m @ scale).tocsr()
    out.eliminate_zeros()
    out.sort_indices()
    return out
