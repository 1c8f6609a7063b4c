"""MLLMRec (Dang et al., arXiv 2508.15304): MLLM-derived item and user inputs, a frozen item-item
graph, and two MLPs scored by a dot product, as a Flax module and its functions on the model
interface.

The inputs are two extra files of the dataset (`base.Model.input_files`): F, one row per item
(the reference's `image_text_feat.npy`: an MLLM's image description joined with the item's
metadata, text-encoded) and P, one row per user (`user_preferences_feat.npy`: an LLM-written
profile, text-encoded). Both are frozen.

The math:
  S   = D^-1/2 (B + J) D^-1/2, D the row sums of B + J (0 where a row sums to 0)
        B: the top-knn_k cosine neighbours of F (self included), kept as 1 where the
           similarity is >= pure, dropped otherwise;
        J: the top-knn_jac item-item Jaccard similarities over the TRAINING users, weighted
           (`jaccard_knn_graph`, with the reference's float32 "diagonal" removal);
  e   = sum_{l=0..L} S^l F                     (L = n_ii_layers; 1 in the reference: F + S F)
  h_i = W2 leaky_relu(W1 e_i + b1) + b2        (F_dim -> 4*dim -> dim, both with bias)
  h_u = V2 leaky_relu(V1 P_u + c1) + c2        (the same shape over the profile)
  loss = BPR(h_u, h_i+, h_i-) = mean -log sigmoid(h_u.h_i+ - h_u.h_i-)
No L2 term and no user-item propagation: the reference builds a normalised user-item
adjacency and never uses it (its UI-GCN is commented out), so it is not built here. Evaluation
scores h_u . h_i from a fresh forward pass (the reference's full_sort_predict).

S and F are frozen and the towers read only e, so e is computed ONCE on the host when a point's
frozen inputs are built (`item_inputs`), not per step. The graph is built sparsely, in row
blocks (`item_graph`), so that it fits in memory at Amazon-Elec scale (63k items); the
reference builds it as dense I x I matrices.

State, on the interface of `models/base.py`:
- params: `item_tower`, `user_tower`, each {'hidden': {kernel (d_in, 4 dim), bias},
  'out': {kernel (4 dim, dim), bias}} (the reference's MLP/MLP_1 and MLP_u/MLP_u_1).
- carry: `()`; host: `{}`; scalars: `{}` (the trainer adds the learning rate).
- frozen: `Frozen(items=e (I, F_dim), users=P (U, P_dim))`, float32 (or bfloat16, below),
  replicated.
- sweep fields: knn_k, knn_jac, pure and n_ii_layers reach the step only through the values
  of e (a fixed (I, F_dim) shape), so points differing in them can share a compiled program.

`model.matmul_dtype = 'bfloat16'` (ours, not the reference's; default 'float32') stores e and P
in bfloat16 (rounded once, in `frozen_inputs`: half the bytes) and runs both towers' first
layers, the dominant FLOPs, with bfloat16 operands and float32 accumulation
(`layers.mixed_matmul`); parameters, the second layers and the loss stay float32.

Where the code reproduces a quirk of the reference (Yuzhuo-Dang/MLLMRec, src/models/mllmrec.py
and src/utils/utils.py) on purpose, a comment says so at that place.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import linen as nn

from lirdrec_jax import graph, losses
from lirdrec_jax.models import base
from lirdrec_jax.models.layers import TorchDense, matmul_dtype_checks, matmul_input_dtype

# The config fields of `data` that name the two input files, and their rows.
ITEM_FILE_FIELD = 'image_text_file'
USER_FILE_FIELD = 'user_profile_file'
BUILD_COMMAND = 'python -m data_prep.mllmrec --data_dir {data_dir} --dataset {dataset}'
INPUT_FILES = (base.InputFile(ITEM_FILE_FIELD, 'items', BUILD_COMMAND),
               base.InputFile(USER_FILE_FIELD, 'users', BUILD_COMMAND))

# The reference's "diagonal" test and denominator epsilon of the Jaccard similarity, in float32.
JACCARD_EPSILON = np.float32(1e-7)
# Length-two paths (item -> user -> item) whose co-occurrence counts one block of
# `jaccard_knn_graph` holds at once (a few hundred MB of COO entries at most).
JACCARD_BLOCK_PATHS = 1 << 24


# ----------------------------------------------------------------------------------------------
# The frozen item graph and the item inputs (host, built once per point)
# ----------------------------------------------------------------------------------------------

def pure_knn_graph(features: np.ndarray, knn_k: int, pure: float) -> sp.csr_matrix:
    """B: the top-knn_k cosine neighbours of every item (itself included), 1 where the
    similarity is >= pure, absent otherwise. (n_items, n_items) float64 CSR.

    The reference scatters the top-k similarities into a dense zero matrix and then sets every
    entry < pure to 0 and every entry >= pure to 1, comparing in float32 (`pure` rounded to
    float32 first, as torch compares a float32 tensor with a Python float). With pure > 0
    (config_checks) that keeps exactly the top-k entries >= pure.
    """
    values, indices = graph.cosine_knn(features, knn_k)
    keep = values >= np.float32(pure)
    rows = np.repeat(np.arange(features.shape[0]), knn_k)[keep.ravel()]
    n = features.shape[0]
    return sp.csr_matrix((np.ones(rows.size), (rows, indices.ravel()[keep.ravel()])),
                         shape=(n, n))


def item_user_counts(train_users: np.ndarray, train_items: np.ndarray, n_users: int,
                     n_items: int) -> sp.csr_matrix:
    """(n_items, n_users) float64 CSR: how often each (item, user) pair occurs in training.

    A repeated training row counts twice, as in the reference's dense `toarray()` of its
    interaction matrix (MMRec's Amazon data has no repeated rows).
    """
    return sp.csr_matrix((np.ones(np.size(train_users)), (np.asarray(train_items, np.int64),
                                                          np.asarray(train_users, np.int64))),
                         shape=(n_items, n_users))


def jaccard_values(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """The reference's float32 Jaccard: inter / (union + 1e-7), then the entries EQUAL to 1.0
    set to 0 (its "diagonal" removal), all in float32.

    Reproduced on purpose, bit for bit: in float32, 1 + 1e-7 rounds to 1.0000001 while
    u + 1e-7 rounds to u for every union u >= 2. So the test `== 1` removes the self-similarity
    of items with at least two training users and ALSO the pairs of distinct items with the same
    (at least two) training users, while an item with exactly one training user keeps its
    self-loop (1/1.0000001 = 0.9999999), as does a pair of items whose only training user is
    the same one.

    Args:
      intersection, union: co-occurrence counts and |U_i| + |U_j| - intersection (integers,
        any float or int dtype, exact in float32 below 2^24).

    Returns:
      float32 array of the same shape.
    """
    inter = np.asarray(intersection, np.float32)
    jac = inter / (np.asarray(union, np.float32) + JACCARD_EPSILON)
    jac[jac == np.float32(1.0)] = 0.0
    return jac


def _path_blocks(counts: sp.csr_matrix, budget: int) -> list:
    """Row ranges of `counts` whose co-occurrence rows hold at most about `budget` entries (a
    single row may exceed it): the number of length-two paths bounds a row's entries."""
    binary = counts.copy()
    binary.data[:] = 1.0
    user_degree = np.asarray(binary.sum(axis=0)).ravel()
    paths = binary @ user_degree
    cuts, start, total = [], 0, 0.0
    for row, p in enumerate(paths):
        if total + p > budget and row > start:
            cuts.append((start, row))
            start, total = row, 0.0
        total += p
    cuts.append((start, counts.shape[0]))
    return cuts


def jaccard_blocks(train_users: np.ndarray, train_items: np.ndarray, n_users: int,
                   n_items: int, block_paths: int = JACCARD_BLOCK_PATHS):
    """The positive item-item Jaccard similarities over training users (`jaccard_values`), one
    block of item rows at a time, computed from the sparse (item, user) count matrix.

    Yields:
      (start, block): `block` is a (stop - start, n_items) float64 CSR of the rows start..stop-1
      holding the float32 values > 0 (pairs that never co-occur are 0 and not stored).
    """
    counts = item_user_counts(train_users, train_items, n_users, n_items)
    degree = np.asarray(counts.sum(axis=1)).ravel()
    counts_t = counts.T.tocsr()
    for start, stop in _path_blocks(counts, block_paths):
        inter = (counts[start:stop] @ counts_t).tocoo()
        rows = inter.row + start
        jac = jaccard_values(inter.data, degree[rows] + degree[inter.col] - inter.data)
        keep = jac > 0
        yield start, sp.csr_matrix((jac[keep].astype(np.float64),
                                    (inter.row[keep], inter.col[keep])),
                                   shape=(stop - start, n_items))


def jaccard_knn_graph(train_users: np.ndarray, train_items: np.ndarray, n_users: int,
                      n_items: int, knn_jac: int,
                      block_paths: int = JACCARD_BLOCK_PATHS) -> sp.csr_matrix:
    """J: every item's top-knn_jac Jaccard similarities over training users (`jaccard_values`),
    weighted by the similarity. (n_items, n_items) float64 CSR holding float32 values.

    Computed sparsely, block of item rows by block (`jaccard_blocks`), keeping the top knn_jac
    of each row. The reference takes `torch.topk` over the whole dense row, zeros included;
    pairs that never co-occur are 0 and contribute nothing whether picked or not, so ranking
    only the positive entries gives the same matrix. Ties go to the lower item index
    (`graph.top_k_per_row`); torch's order of ties is unspecified, and Jaccard values tie often
    (the parity command compares tie rows outside their tied entries). Non-positive values are
    dropped: the reference's top-k ranks the (many) zeros above them (a negative value needs
    repeated training rows).
    """
    parts = [graph.top_k_per_row(block, knn_jac)
             for _, block in jaccard_blocks(train_users, train_items, n_users, n_items,
                                            block_paths)]
    out = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((n_items, n_items))
    out.sort_indices()
    return out


def item_graph(features: np.ndarray, train_users: np.ndarray, train_items: np.ndarray,
               n_users: int, n_items: int, knn_k: int, knn_jac: int,
               pure: float) -> sp.csr_matrix:
    """S = D^-1/2 (B + J) D^-1/2 with D the row sums of B + J (`graph.sym_norm_by_row_sums`,
    the reference's `get_dense_laplacian(..., 'sym')`). (n_items, n_items) float64 CSR.

    B + J adds the two graphs entry by entry: a neighbour in both gets 1 + its Jaccard weight.
    Rows of B + J are not symmetric, and the normalisation uses row sums only, as the
    reference does.
    """
    b = pure_knn_graph(features, knn_k, pure)
    j = jaccard_knn_graph(train_users, train_items, n_users, n_items, knn_jac)
    return graph.sym_norm_by_row_sums(b + j)


def item_inputs(item_graph_: sp.spmatrix, features: np.ndarray, n_layers: int,
                block_cols: int = 256) -> np.ndarray:
    """e = sum_{l=0..n_layers} S^l F (the reference's II_GCN: the layers summed, layer 0
    included), computed in float64 column block by column block, returned as float32.

    Args:
      item_graph_: (n_items, n_items) S.
      features: (n_items, F_dim) F.
      n_layers: L >= 0.
    """
    s = sp.csr_matrix(item_graph_, dtype=np.float64)
    out = np.empty(features.shape, np.float32)
    for start in range(0, features.shape[1], block_cols):
        layer = np.asarray(features[:, start:start + block_cols], np.float64)
        total = layer.copy()
        for _ in range(n_layers):
            layer = s @ layer
            total += layer
        out[:, start:start + block_cols] = total
    return out


# ----------------------------------------------------------------------------------------------
# The towers
# ----------------------------------------------------------------------------------------------

class BiasedTower(nn.Module):
    """Linear(d -> 4*dim) -> leaky_relu(0.01) -> Linear(4*dim -> dim), both WITH bias (the
    reference's MLP / MLP_1; LIRDRec's `layers.Tower` has no output bias), nn.Linear's init.
    (n, d) -> (n, dim).

    Kept as the reference has it although, in the ITEM tower, the output bias b adds b.h_u to
    the positive and the negative score of every BPR row and cancels: its gradient is rounding
    noise (measured exactly 0 here, where a row's two terms are summed side by side; float32
    noise in the reference, which Adam turns into steps of up to lr), and it never changes a
    ranking.

    `matmul_dtype` is the first layer's (`layers.mixed_matmul`); the second is float32.
    """
    dim: int
    matmul_dtype: str = 'float32'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = nn.leaky_relu(TorchDense(4 * self.dim, matmul_dtype=self.matmul_dtype,
                                          name='hidden')(x), negative_slope=0.01)
        return TorchDense(self.dim, name='out')(hidden)


class MLLMRecNet(nn.Module):
    """(item rows of e (n, F_dim), user rows of P (m, P_dim)) -> (h_u (m, dim), h_i (n, dim)).

    Rows are independent, so the caller may pass all items and users (evaluation) or only a
    batch's rows (training): the same function and, for the weights, the same gradients.
    `matmul_dtype`: of both towers' first layers.
    """
    dim: int = 64
    matmul_dtype: str = 'float32'

    @nn.compact
    def __call__(self, items: jax.Array, users: jax.Array) -> tuple:
        h_i = BiasedTower(self.dim, self.matmul_dtype, name='item_tower')(items)
        h_u = BiasedTower(self.dim, self.matmul_dtype, name='user_tower')(users)
        return h_u, h_i


def batch_loss(net: MLLMRecNet, params, batch, items: jax.Array, users: jax.Array) -> jax.Array:
    """BPR over the batch (mean -log sigmoid of the score margin; no L2 term, as the reference).

    The reference runs both towers over ALL items and users every step and then gathers the
    batch's rows; the towers act row by row, so running them on the gathered rows is the same
    function with the same weight gradients (rows outside the batch get a zero output
    gradient either way), at 3 * batch rows instead of n_items + n_users. The item rows are
    interleaved (pos_0, neg_0, pos_1, neg_1, ...): a row's positive and negative terms of the
    weight gradients nearly cancel (they share -/+ sigmoid(.) h_u), and summing them next to
    each other keeps float32 partial sums small (the item tower's gradients 3-8x closer to
    the float64 ones than with [positives; negatives], measured on the parity test's data).

    Args:
      batch: users, positives, negatives (B,) int32; weights (B,) float32 (0 on padding rows).
      items, users: the frozen e (n_items, F_dim) and P (n_users, P_dim).
    """
    pairs = jnp.stack([batch.positives, batch.negatives], axis=1).reshape(-1)
    h_u, h_i = net.apply({'params': params}, items[pairs], users[batch.users])
    return losses.bpr_loss(h_u, h_i[0::2], h_i[1::2], batch.weights)


# ----------------------------------------------------------------------------------------------
# The model interface (models/base.py)
# ----------------------------------------------------------------------------------------------

class Prepared(NamedTuple):
    """Host-side inputs shared by every point of a dataset.

    Attributes:
      items: (n_items, F_dim) float32 F, the item input file.
      users: (n_users, P_dim) float32 P, the user input file.
      train_users, train_items: (n_train,) the training interactions (for J).
      n_users, n_items: the dataset's counts.
    """
    items: np.ndarray
    users: np.ndarray
    train_users: np.ndarray
    train_items: np.ndarray
    n_users: int
    n_items: int


class Frozen(NamedTuple):
    """A point's frozen inputs: e (n_items, F_dim) and P (n_users, P_dim), float32, or bfloat16
    with `model.matmul_dtype = 'bfloat16'`."""
    items: jax.Array
    users: jax.Array


def config_checks(cfg, n_users: int, n_items: int) -> list:
    """Every check of MLLMRec's `model` section (fields named as in configs/mllmrec.py)."""
    del n_users
    m = cfg.model
    return [
        (m.feat_embed_dim >= 1, 'model.feat_embed_dim', '>= 1'),
        (1 <= m.knn_k <= n_items, 'model.knn_k', f'in [1, n_items={n_items}]'),
        (1 <= m.knn_jac <= n_items, 'model.knn_jac', f'in [1, n_items={n_items}]'),
        # The reference sets every entry >= pure of its DENSE similarity matrix to 1: with
        # pure <= 0 the zeros outside the top-k would become edges too.
        (0.0 < m.pure <= 1.0, 'model.pure', 'in (0, 1] (the similarity an edge needs)'),
        (m.n_ii_layers >= 0, 'model.n_ii_layers', '>= 0'),
    ] + matmul_dtype_checks(m)


def _input(dataset, field: str, rows: str, n: int) -> np.ndarray:
    """dataset.extra[field] as float32, checked to have n rows (it must have been loaded)."""
    table = dataset.extra.get(field) if dataset.extra is not None else None
    if table is None:
        command = BUILD_COMMAND.format(data_dir='<data_dir>', dataset=dataset.name)
        raise ValueError(f'MLLMRec needs the {rows} input file named by config field '
                         f'data.{field} (built by: {command}); dataset {dataset.name!r} was '
                         'loaded without it')
    table = np.asarray(table, np.float32)
    if table.ndim != 2 or table.shape[0] != n:
        raise ValueError(f'the file of config field data.{field} has shape {table.shape}; '
                         f'expected ({n}, d): one row per {rows[:-1]}')
    return table


def prepare(dataset) -> Prepared:
    """The two input files of an `MMRecDataset` (`dataset.extra`) and its training pairs."""
    items = _input(dataset, ITEM_FILE_FIELD, 'items', dataset.n_items)
    users = _input(dataset, USER_FILE_FIELD, 'users', dataset.n_users)
    norms = np.sqrt(np.einsum('ij,ij->i', items, items, dtype=np.float64))
    if not np.all(np.isfinite(norms)) or (norms == 0).any():
        bad = int(np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))[0])
        raise ValueError(f'row {bad} of the item input file (config field '
                         f'data.{ITEM_FILE_FIELD}) has norm {norms[bad]}; expected finite, '
                         'non-zero rows (their cosine similarities define the item graph; the '
                         'reference would compute NaN)')
    if not np.all(np.isfinite(users)):
        raise ValueError(f'the user input file (config field data.{USER_FILE_FIELD}) holds '
                         'NaN or Inf values; expected finite values')
    train = dataset.train
    return Prepared(items, users, np.asarray(train.users), np.asarray(train.items),
                    int(dataset.n_users), int(dataset.n_items))


def point_item_graph(prepared: Prepared, model_cfg) -> sp.csr_matrix:
    """The frozen item graph S of one point (knn_k, knn_jac, pure)."""
    return item_graph(prepared.items, prepared.train_users, prepared.train_items,
                      prepared.n_users, prepared.n_items, int(model_cfg.knn_k),
                      int(model_cfg.knn_jac), float(model_cfg.pure))


def frozen_inputs(prepared: Prepared, dataset, model_cfg) -> Frozen:
    """e from the point's item graph (computed here, once) and P, in the point's
    `model.matmul_dtype` (float32, or bfloat16 copies rounded from the float32 e and P). The
    graph is not cached on disk (the reference caches it as ii_mat_{knn_jac}_{pure}.pt in the
    data folder)."""
    del dataset
    dtype = matmul_input_dtype(str(model_cfg.get('matmul_dtype', 'float32')))
    cast = lambda x: x if x.dtype == dtype else np.asarray(x, dtype)
    s = point_item_graph(prepared, model_cfg)
    return Frozen(cast(item_inputs(s, prepared.items, int(model_cfg.n_ii_layers))),
                  cast(prepared.users))


def place_frozen(frozen: Frozen, partitioner, options) -> Frozen:
    """Both tables replicated on every device (a batch gathers arbitrary rows). The host
    arrays are placed as they are (already in their dtype), so that a vmapped group's
    placement, memoised on the host object (equal tables made one object), places a table the
    points share (P) once."""
    del options
    return Frozen(*partitioner.replicate([frozen.items, frozen.users]))


def create(model_cfg, n_users: int, n_items: int, layout=None) -> MLLMRecNet:
    """The net; the input widths come from the frozen tables at `init`."""
    del n_users, n_items, layout
    return MLLMRecNet(dim=int(model_cfg.feat_embed_dim),
                      matmul_dtype=str(model_cfg.get('matmul_dtype', 'float32')))


def init(key: jax.Array, net: MLLMRecNet, frozen: Frozen, host_frozen: Frozen) -> tuple:
    """(params, carry=()): nn.Linear's default initialisation for all four layers."""
    del host_frozen
    params = net.init(key, frozen.items[:1], frozen.users[:1])['params']
    return params, ()


def host_init(model_cfg) -> dict:
    del model_cfg
    return {}


def epoch_schedule(model_cfg, host: dict, epoch: int) -> tuple:
    """Nothing is scheduled (the reference's learning-rate factor is 1.0, owned by the trainer).
    Returns (host, scalars)."""
    del model_cfg, epoch
    return host, {}


def loss(net: MLLMRecNet, params, carry, batch, frozen: Frozen, epoch_in, scalars: dict,
         rng) -> tuple:
    """(BPR loss of one batch, carry); see `batch_loss`."""
    del epoch_in, scalars, rng
    return batch_loss(net, params, batch, frozen.items, frozen.users), carry


def eval_embeddings(net: MLLMRecNet, params, carry, frozen: Frozen, epoch_in, scalars,
                    eval_mode) -> tuple:
    """A fresh forward pass over all users and items (the reference's full_sort_predict)."""
    del carry, epoch_in, scalars, eval_mode
    return net.apply({'params': params}, frozen.items, frozen.users)


def flops_per_batch(model_cfg, size: base.ProblemSize) -> float:
    """An analytic count of the FLOPs of one training step (forward and backward).

    The towers run on 2 * batch item rows and batch user rows. Per row of input width d:
    forward 2 (d * 4 dim + 4 dim * dim), the kernels' gradients as much again, and the hidden
    layer's input gradient 2 * 4 dim * dim (the inputs e and P are constants: no gradient).
    """
    dim = int(model_cfg.feat_embed_dim)
    # ProblemSize has no field for a model's extra inputs: their width is taken to be the text
    # features' (what the no-LLM inputs have, which the benchmark uses).
    f_dim = p_dim = int(size.feature_dims[-1])
    per_row = lambda d: 2 * 2 * (d * 4 * dim + 4 * dim * dim) + 2 * 4 * dim * dim
    return float(2 * size.batch_size * per_row(f_dim) + size.batch_size * per_row(p_dim))


MODEL = base.Model(
    name='mllmrec', batch_kind='bpr',
    sweep_fields=('model.knn_k', 'model.knn_jac', 'model.pure', 'model.n_ii_layers'),
    config_checks=config_checks, static_key=base.no_static_key, prepare=prepare,
    frozen_inputs=frozen_inputs, place_frozen=place_frozen, create=create, init=init,
    host_init=host_init, epoch_schedule=epoch_schedule, epoch_inputs=base.no_epoch_inputs,
    start_epoch=base.keep_state, loss=loss, eval_embeddings=eval_embeddings,
    flops_per_batch=flops_per_batch,
    parity=base.ParityHooks(module='lirdrec_jax.parity.mllmrec',
                            reference_repo='Yuzhuo-Dang/MLLMRec'),
    input_files=INPUT_FILES)
