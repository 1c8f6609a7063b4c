"""DGVAE (Zhou et al., arXiv 2402.16110): two disentangled user-row VAEs, one over the user's
training items (CF view) and one over the words of those items (text view), tied by a
co-attention between their K factors, as plain functions over an explicit parameter dict.

The math, per batch of users (x: the user's item row, t: its word row; both views alike unless
said; `n` = items or words, `l2` = row-wise L2 normalisation):
  c      = softmax(l2(E) l2(P)^T / tau + g)              (n, K) factor of each item/word;
                                                          g ~ Gumbel in training, g = 0 in eval
  x_k    = l2(x * c[:, k])                                 (B, n) per factor k
  x_k    = (x_k + x_k G G) / 2                             CF view only (G: the frozen kNN item
                                                          graph; the text view's G is I)
  h_k    = dropout(x_k) W + b                              (B, 2d) one Linear
  mu_k   = l2(h_k[:, :d]),  logvar_k = -h_k[:, d:]
  z_k    = l2(mu_k + eps * exp(logvar_k / 2))              eps ~ N(0, std^2); z_k = l2(mu_k) in eval
  t|cf   = att(q=z_cf, k=z_txt, v=z_txt), cf|t = att(q=z_txt, k=z_cf, v=z_cf)     (B, K, d)
  att    = (tanh(Q K^T) * sigmoid(A - rowmean A)) V,  A_ij = -||q_i - k_j||_1
  z      = cf|t + t|cf                                      shared by both decoders
  logits = log sum_k c[:, k] * exp(z_k . l2(E)^T / tau)     (B, n) per view
  loss   = CE_cf + a_r KL_cf + lambda_text (CE_txt + a_t KL_txt) + lambda_reg MI(cf|t, t|cf)
  CE     = -sum_j log_softmax(logits)_j x_j,   KL = sum_k -1/2 sum_d (1 + logvar - exp(logvar))
  MI     = 1/K sum_k [mean_{j!=k} softplus(a_k . b_j) + softplus(-a_k . b_k)]
  a      = min(anneal_cap, step / total_anneal_steps)       step = 1, 2, ... over all batches
with every per-row term averaged over the batch's real rows. Evaluation ranks the CF logits.

State, on the interface of `models/base.py`:
- params: per view (`cf_network`, `text_network`, the reference's module names):
  `encoder` {'kernel' (n, 2d), 'bias' (2d,)}, `item_embeddings` (n, d),
  `prototype_embeddings` (K, d).
- carry: {'update': int32}, the number of steps taken (the reference's `self.update`, which
  the KL annealing reads); checkpoints save it.
- host: {}. scalars: every numeric `model` field (`SCALAR_FIELDS`), so all of them are sweep
  fields.
- frozen: the rows of G G (`TwoHop`, G the kNN item graph) and the two user matrices as CSR
  arrays (`CsrRows`): training-item counts and word TF-IDF. The step gathers the batch's rows
  on the device (`gather_rows`); no dense (users x items) or (items x items) matrix exists.
  The graph enters through the batch's few training entries (`cf_encoder_input`), not as a
  product with dense rows, so `graph.spmm_impl` does not apply to this model.
- batches: 'user_rows' (`sampling.user_row_batches`): all users, shuffled, 0-weight padding.

Evaluation: `eval_embeddings` returns the users' K factor vectors z (n_users, K, d) and the
items' unit embeddings and log factor assignments; `score` ranks with the logits above (not a
dot product, hence the interface's `score` hook).

`model.matmul_dtype = 'bfloat16'` (ours, not the reference's; default 'float32') runs the two
encoders' (K B, n) x (n, 2d) products, two thirds of the dense FLOPs, with bfloat16 operands
and float32 accumulation (`layers.mixed_matmul`, gradients included). Their inputs x_k are
computed in the step from the user rows and the trainable assignments, so they are rounded
there; the stored user matrices, the parameters, the decoders (whose logits are scaled by
1/tau) and the loss stay float32.

Where the code reproduces a quirk of the reference (enoche/DGVAE, code/dgvae.py, main.py,
dataset.py) on purpose, or deliberately differs from it, a comment says so at that place.
"""
import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from lirdrec_jax import graph
from lirdrec_jax.models import base
from lirdrec_jax.models.layers import matmul_dtype_checks, mixed_matmul

WORDS_FIELD = 'words_file'
WORDS_BUILD = 'python -m data_prep.words --data_dir {data_dir} --dataset {dataset}'
# The `model` fields that reach the step as scalars (all sweepable).
SCALAR_FIELDS = ('tau', 'dropout', 'std', 'text_std', 'lambda_text', 'lambda_reg',
                 'rating_anneal_cap', 'text_anneal_cap', 'rating_total_anneal_steps',
                 'text_total_anneal_steps', 'item_reg', 'prototype_reg')
# Users per chunk when `eval_embeddings` encodes every user.
EVAL_CHUNK = 512
# torch.nn.functional.normalize's floor on the norm.
NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# User rows from CSR arrays on the device
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['indptr', 'indices', 'values'],
                   meta_fields=['n_cols', 'budgets'])
@dataclasses.dataclass(frozen=True)
class CsrRows:
    """A sparse (n_rows, n_cols) matrix as CSR arrays, for gathering dense rows in a step.

    Attributes:
      indptr: (n_rows + 1,) int32 row pointers.
      indices: (nnz,) int32 column of each entry, sorted within a row, no duplicates.
      values: (nnz,) float32.
      n_cols: the column count (static).
      budgets: static; budgets[j] = the entries of the 2**j longest rows together (at least 1),
        j = 0 .. ceil(log2(n_rows)): how many entries a gather of up to 2**j rows reserves.
    """
    indptr: jax.Array
    indices: jax.Array
    values: jax.Array
    n_cols: int
    budgets: Tuple[int, ...]

    def budget(self, n_rows: int) -> int:
        """Entries reserved for a gather of `n_rows` rows (any rows)."""
        j = max(0, math.ceil(math.log2(max(1, n_rows))))
        return self.budgets[min(j, len(self.budgets) - 1)]


def csr_rows(matrix: sp.spmatrix) -> CsrRows:
    """The host `CsrRows` of a scipy matrix (canonical: duplicates summed, indices sorted)."""
    m = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    m.sum_duplicates()
    lengths = np.sort(np.diff(m.indptr))[::-1]
    top = np.concatenate([[0], np.cumsum(lengths)])
    n = m.shape[0]
    budgets = tuple(max(1, int(top[min(2 ** j, n)]))
                    for j in range(max(1, math.ceil(math.log2(max(1, n)))) + 1))
    return CsrRows(m.indptr.astype(np.int32), m.indices.astype(np.int32),
                   m.data.astype(np.float32), int(m.shape[1]), budgets)


class Rows(NamedTuple):
    """A batch of B sparse input rows, dense and as their entries (E slots).

    Attributes:
      dense: (B, n) float32.
      row: (E,) int32 batch row of each entry; B on unused slots.
      col: (E,) int32 column of each entry (0 on unused slots).
      value: (E,) float32 (0 on unused slots).
    """
    dense: jax.Array
    row: jax.Array
    col: jax.Array
    value: jax.Array


def gather_rows(csr: CsrRows, rows: jax.Array) -> Rows:
    """The rows `rows` ((b,) int) of `csr`, from at most `csr.budget(b)` gathered entries (row
    j's entries occupy the positions starts[j]..ends[j] of the slots)."""
    b = rows.shape[0]
    lengths = csr.indptr[rows + 1] - csr.indptr[rows]
    ends = jnp.cumsum(lengths)
    starts = ends - lengths
    budget = csr.budget(b)
    position = jnp.arange(budget, dtype=jnp.int32)
    # Row of each position: how many rows start at or before it, minus one (empty rows start
    # where the next row does, and are passed over).
    row = jnp.cumsum(jnp.zeros(budget, jnp.int32).at[starts].add(1, mode='drop')) - 1
    row = jnp.clip(row, 0, b - 1)
    valid = position < ends[-1]
    entry = jnp.where(valid, csr.indptr[rows[row]] + position - starts[row], 0)
    row = jnp.where(valid, row, b)  # out of range: dropped by every scatter
    col = jnp.where(valid, csr.indices[entry], 0)
    value = jnp.where(valid, csr.values[entry], 0.0)
    dense = jnp.zeros((b, csr.n_cols), jnp.float32).at[row, col].add(value, mode='drop')
    return Rows(dense, row, col, value)


def dense_rows(csr: CsrRows, rows: jax.Array) -> jax.Array:
    """(b, n_cols) float32: the dense rows `rows` ((b,) int) of `csr`."""
    return gather_rows(csr, rows).dense


def rows_of_dense(x: jax.Array, n_entries: int) -> Rows:
    """`Rows` of a dense (B, n) batch with at most `n_entries` non-zeros (tests, parity)."""
    row, col = jnp.nonzero(x, size=n_entries, fill_value=(x.shape[0], 0))
    value = jnp.where(row < x.shape[0], x[jnp.minimum(row, x.shape[0] - 1), col], 0.0)
    return Rows(x, row.astype(jnp.int32), col.astype(jnp.int32), value)


class TwoHop(NamedTuple):
    """The rows of G G (G: the kNN item graph), padded to one width r: row i holds the items
    two hops from item i and the summed products of the edge values on the way.

    Attributes:
      cols: (n_items, r) int32; n_items on padding slots (dropped by the scatter).
      values: (n_items, r) float32; 0 on padding slots.
    """
    cols: jax.Array
    values: jax.Array


def two_hop_rows(item_graph: sp.spmatrix) -> TwoHop:
    """`TwoHop` of a (n_items, n_items) scipy graph: G G in float64, rounded to float32. Its
    rows have at most (entries per row of G)^2 entries (a kNN graph mixed from two modalities:
    at most (2k)^2)."""
    g = sp.csr_matrix(item_graph, dtype=np.float64)
    g2 = (g @ g).tocsr()
    g2.sum_duplicates()
    g2.sort_indices()
    n = g2.shape[0]
    lengths = np.diff(g2.indptr)
    width = max(1, int(lengths.max(initial=0)))
    cols = np.full((n, width), n, np.int32)
    values = np.zeros((n, width), np.float32)
    slot = np.arange(g2.nnz) - np.repeat(g2.indptr[:-1], lengths)
    rows = np.repeat(np.arange(n), lengths)
    cols[rows, slot] = g2.indices
    values[rows, slot] = g2.data
    return TwoHop(cols, values)


# ----------------------------------------------------------------------------------------------
# Inputs, net, noise
# ----------------------------------------------------------------------------------------------

class Prepared(NamedTuple):
    """Host-side inputs shared by every point of a dataset.

    Attributes:
      ratings: (n_users, n_items) float32 CSR, the number of training rows of each pair.
      words: (n_users, n_words) float32 CSR, the word view (`data.words_file`).
      image, text: (n_items, d_m) float32 feature tables (for the kNN graph), or None.
    """
    ratings: sp.csr_matrix
    words: sp.csr_matrix
    image: Optional[np.ndarray]
    text: Optional[np.ndarray]


class Frozen(NamedTuple):
    """A point's frozen inputs.

    Attributes:
      two_hop: the rows of G G, G the kNN item graph (`TwoHop`).
      ratings, words: `CsrRows` of the two user matrices.
    """
    two_hop: TwoHop
    ratings: CsrRows
    words: CsrRows


class DgvaeNet(NamedTuple):
    """The static, hashable description of the computation (what `create` returns). The word
    count is the word matrix's (`CsrRows.n_cols` of the frozen inputs)."""
    n_users: int
    n_items: int
    dim: int = 64
    n_prototypes: int = 3
    matmul_dtype: str = 'float32'  # of the encoders' products (`encode`)


class Noise(NamedTuple):
    """Every random draw of one training forward (given explicitly, so that a restatement or
    the reference can be fed the same draws).

    Attributes:
      cf_gumbel, text_gumbel: (n, K) standard Gumbel noise of the factor assignments.
      cf_keep, text_keep: (K, B, n) 1.0 where dropout keeps an input entry, else 0.0.
      cf_eps, text_eps: (K, B, d) reparameterisation noise, already times std (N(0, std^2)).
    """
    cf_gumbel: jax.Array
    text_gumbel: jax.Array
    cf_keep: jax.Array
    text_keep: jax.Array
    cf_eps: jax.Array
    text_eps: jax.Array


def draw_noise(rng: jax.Array, net: DgvaeNet, n_words: int, batch_size: int,
               scalars: dict) -> Noise:
    """The training noise of one step from `rng` (the reference draws the same kinds with
    torch's global RNG, so the streams differ; the distributions are the same).

    Every draw is cut from one uniform draw u in (0, 1) (one random-bits kernel to compile
    instead of six): Gumbel -log(-log u), keep u < 1 - dropout, normal sqrt(2) erfinv(2u - 1).
    """
    k, d, b = net.n_prototypes, net.dim, batch_size
    shapes = ((net.n_items, k), (n_words, k), (k, b, net.n_items), (k, b, n_words), (k, b, d),
              (k, b, d))
    sizes = [math.prod(shape) for shape in shapes]
    tiny = jnp.finfo(jnp.float32).tiny
    u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, minval=tiny, maxval=1.0)
    parts, start = [], 0
    for shape, size in zip(shapes, sizes):
        parts.append(u[start:start + size].reshape(shape))
        start += size
    gumbel = lambda x: -jnp.log(-jnp.log(x))
    keep = lambda x: (x < 1.0 - scalars['dropout']).astype(jnp.float32)
    # 2u - 1 rounds to -1 for the smallest u (erfinv(-1) = -inf): kept inside (-1, 1).
    lowest = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    normal = lambda x: jnp.sqrt(2.0) * jax.scipy.special.erfinv(
        jnp.maximum(2.0 * x - 1.0, lowest))
    return Noise(cf_gumbel=gumbel(parts[0]), text_gumbel=gumbel(parts[1]),
                 cf_keep=keep(parts[2]), text_keep=keep(parts[3]),
                 cf_eps=scalars['std'] * normal(parts[4]),
                 text_eps=scalars['text_std'] * normal(parts[5]))


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------

def init_params(key: jax.Array, net: DgvaeNet, n_words: int) -> dict:
    """The reference's initialisation: xavier_normal for the encoder weight and both
    embeddings, N(0, 0.01^2) for the encoder bias."""
    def xavier(k, shape):
        return jnp.sqrt(2.0 / (shape[0] + shape[1])) * jax.random.normal(k, shape)

    def view(k, n):
        ks = jax.random.split(k, 4)
        return {'encoder': {'kernel': xavier(ks[0], (n, 2 * net.dim)),
                            'bias': 0.01 * jax.random.normal(ks[1], (2 * net.dim,))},
                'item_embeddings': xavier(ks[2], (n, net.dim)),
                'prototype_embeddings': xavier(ks[3], (net.n_prototypes, net.dim))}

    k_cf, k_text = jax.random.split(key)
    return {'cf_network': view(k_cf, net.n_items), 'text_network': view(k_text, n_words)}


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-12) along `axis` (torch.nn.functional.normalize); zero rows stay 0.

    Written as x / sqrt(max(||x||^2, 1e-24)), the same values, so that a zero row (a user
    without training items or words) has a zero gradient, as in torch, instead of the NaN of
    sqrt's derivative at 0."""
    squares = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(squares, NORM_EPS * NORM_EPS))


def factor_assignments(view: dict, tau, gumbel: Optional[jax.Array]) -> tuple:
    """(cates (n, K), log_cates (n, K), unit item embeddings (n, d)).

    Training: softmax(logits + g) (the reference's gumbel_softmax with temperature 1);
    evaluation (`gumbel` None): softmax(logits)."""
    items = l2_normalize(view['item_embeddings'])
    prototypes = l2_normalize(view['prototype_embeddings'])
    logits = items @ prototypes.T / tau
    if gumbel is not None:
        logits = logits + gumbel
    return jax.nn.softmax(logits, axis=-1), jax.nn.log_softmax(logits, axis=-1), items


def cf_encoder_input(rows: Rows, cates: jax.Array, two_hop: TwoHop) -> jax.Array:
    """(K, B, n_items): per factor k, (x_k + x_k G G) / 2 with x_k = l2(x * c[:, k]).

    Computed from the rows' entries: x_k has the support of x (a user's few training items),
    so x_k G G = sum over the entries e of x_k[e] (G G)[col_e, :], a scatter of E x r products
    instead of two dense (B, n) x (n, n) sparse products. The reference multiplies by a dense
    G twice, (x_k G) G: the same sums, grouped differently (float32 rounding)."""
    b, n = rows.dense.shape
    k = cates.shape[1]
    values = rows.value[None, :] * cates[rows.col].T  # (K, E)
    squares = jnp.zeros((k, b), jnp.float32).at[:, rows.row].add(values * values, mode='drop')
    inverse = 1.0 / jnp.sqrt(jnp.maximum(squares, NORM_EPS * NORM_EPS))  # l2_normalize's
    values = values * inverse[:, jnp.minimum(rows.row, b - 1)]
    factor = jnp.arange(k)[:, None]
    xk = jnp.zeros((k, b, n), jnp.float32).at[factor, rows.row[None, :], rows.col[None, :]].add(
        values, mode='drop')
    hop = jnp.zeros((k, b, n), jnp.float32).at[
        factor[:, :, None], rows.row[None, :, None], two_hop.cols[rows.col][None]].add(
        values[:, :, None] * two_hop.values[rows.col][None], mode='drop')
    return (xk + hop) / 2


def text_encoder_input(x: jax.Array, cates: jax.Array) -> jax.Array:
    """(K, B, n_words): l2(x * c[:, k]) per factor. The text view's graph is the identity:
    the reference computes (x_k + x_k I I) / 2, which is x_k exactly."""
    return l2_normalize(x[None, :, :] * cates.T[:, None, :])


def encode(view: dict, xk: jax.Array, keep, eps, dropout,
           matmul_dtype: str = 'float32') -> tuple:
    """The encoder of one view for all K factors; its product in `matmul_dtype`
    (`layers.mixed_matmul`).

    Args:
      view: the view's params.
      xk: (K, B, n) the factors' inputs (`cf_encoder_input`, `text_encoder_input`).
      keep: (K, B, n) dropout keep mask, or None (evaluation: no dropout).
      eps: (K, B, d) reparameterisation noise, or None (evaluation: z = mu).
      dropout: the dropout rate.

    Returns:
      z (B, K, d) unit factor vectors, logvar (K, B, d).
    """
    d = view['encoder']['bias'].shape[0] // 2
    if keep is not None:
        xk = xk * (keep / (1.0 - dropout))  # nn.Dropout: x * (mask / (1 - p))
    k, b, n = xk.shape
    h = (mixed_matmul(xk.reshape(k * b, n), view['encoder']['kernel'], matmul_dtype)
         + view['encoder']['bias']).reshape(k, b, 2 * d)
    mu = l2_normalize(h[..., :d])
    logvar = -h[..., d:]
    z = mu if eps is None else mu + eps * jnp.exp(0.5 * logvar)
    return jnp.transpose(l2_normalize(z), (1, 0, 2)), logvar


def co_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """(B, K, d): (tanh(Q K^T) * sigmoid(A - rowmean(A))) V with A_ij = -||q_i - k_j||_1."""
    p1 = jnp.tanh(jnp.einsum('bid,bjd->bij', q, k))
    p2 = -jnp.sum(jnp.abs(q[:, :, None, :] - k[:, None, :, :]), axis=-1)
    p2 = jax.nn.sigmoid(p2 - jnp.mean(p2, axis=-1, keepdims=True))
    return jnp.einsum('bij,bjd->bid', p1 * p2, v)


def mutual_information_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B,) the reference's JSD-style regulariser per row, already divided by K:
    1/K sum_k [mean_{j != k} softplus(a_k . b_j) + softplus(-a_k . b_k)] for (B, K, d) a, b."""
    n_k = a.shape[1]
    scores = jnp.einsum('bkd,bjd->bkj', a, b)  # (B, K, K): a_k . b_j
    off = 1.0 - jnp.eye(n_k, dtype=scores.dtype)
    negative = jnp.sum(jax.nn.softplus(scores) * off, axis=-1) / max(1, n_k - 1)
    positive = jax.nn.softplus(-jnp.diagonal(scores, axis1=1, axis2=2))
    return jnp.sum(negative + positive, axis=-1) / n_k


def decode_logits(z: jax.Array, items: jax.Array, log_cates: jax.Array, tau) -> jax.Array:
    """(B, n): log sum_k c[:, k] * exp(z_k . items^T / tau), computed as a logsumexp over k (the
    reference exponentiates, sums and takes the log; the same function, and no overflow for
    a small tau)."""
    logits = jnp.einsum('bkd,nd->bkn', z, items) / tau + log_cates.T[None, :, :]
    return jax.nn.logsumexp(logits, axis=1)


def kl_rows(logvar: jax.Array) -> jax.Array:
    """(B,) sum over factors of -1/2 sum_d (1 + logvar - exp(logvar)) for (K, B, d) logvar.

    The reference's KL has no mu^2 term: mu is unit-norm, so it is the constant 1 per factor."""
    return jnp.sum(-0.5 * jnp.sum(1.0 + logvar - jnp.exp(logvar), axis=-1), axis=0)


def ce_rows(x: jax.Array, logits: jax.Array) -> jax.Array:
    """(B,) multinomial cross-entropy -sum_j log_softmax(logits)_j * x_j."""
    return -jnp.sum(jax.nn.log_softmax(logits, axis=-1) * x, axis=-1)


def anneal(step, cap, total_steps):
    """The KL weight at update `step` (1-based): min(cap, step / total_steps); cap when
    total_steps <= 0."""
    ratio = step / jnp.maximum(total_steps, 1.0)
    return jnp.where(total_steps > 0, jnp.minimum(cap, ratio), cap)


class Forward(NamedTuple):
    """What one forward pass gives (B rows): the logits of both views (B, n), the co-attended
    factors cf|t and t|cf (B, K, d), the logvars (K, B, d) of both encoders, and the unit item
    embeddings and log factor assignments of the CF view."""
    cf_logits: jax.Array
    text_logits: jax.Array
    cf_given_text: jax.Array
    text_given_cf: jax.Array
    cf_logvar: jax.Array
    text_logvar: jax.Array
    cf_items: jax.Array
    cf_log_cates: jax.Array


def forward(params: dict, cf_rows: Rows, x_text: jax.Array, two_hop: TwoHop,
            noise: Optional[Noise], tau, dropout, matmul_dtype: str = 'float32') -> Forward:
    """Both encoders, the co-attention and both decoders for the users' item rows `cf_rows` and
    (B, n_words) word rows `x_text`. `noise` None: evaluation mode (softmax assignments, no
    dropout, z = mu). `matmul_dtype`: of the encoders' products."""
    cf, text = params['cf_network'], params['text_network']
    train = noise is not None
    cf_cates, cf_log_cates, cf_items = factor_assignments(
        cf, tau, noise.cf_gumbel if train else None)
    text_cates, text_log_cates, text_items = factor_assignments(
        text, tau, noise.text_gumbel if train else None)
    z_cf, cf_logvar = encode(cf, cf_encoder_input(cf_rows, cf_cates, two_hop),
                             noise.cf_keep if train else None,
                             noise.cf_eps if train else None, dropout, matmul_dtype)
    z_text, text_logvar = encode(text, text_encoder_input(x_text, text_cates),
                                 noise.text_keep if train else None,
                                 noise.text_eps if train else None, dropout, matmul_dtype)
    text_given_cf = co_attention(z_cf, z_text, z_text)
    cf_given_text = co_attention(z_text, z_cf, z_cf)
    z = cf_given_text + text_given_cf
    return Forward(decode_logits(z, cf_items, cf_log_cates, tau),
                   decode_logits(z, text_items, text_log_cates, tau),
                   cf_given_text, text_given_cf, cf_logvar, text_logvar, cf_items, cf_log_cates)


class LossTerms(NamedTuple):
    """The loss of one batch and its parts (batch means over the real rows)."""
    total: jax.Array
    cf_ce: jax.Array
    cf_kl: jax.Array
    text_ce: jax.Array
    text_kl: jax.Array
    mi: jax.Array
    reg: jax.Array
    rating_anneal: jax.Array
    text_anneal: jax.Array


def weight_norm_reg(view: dict, item_reg, prototype_reg) -> jax.Array:
    """The reference's optional reg_loss of one view: item_reg ||E|| + prototype_reg (||P|| +
    ||W_enc||) (Frobenius norms, not squared). Zero at its default weights (0, 0)."""
    norm = lambda a: jnp.sqrt(jnp.sum(a * a))
    return (item_reg * norm(view['item_embeddings'])
            + prototype_reg * (norm(view['prototype_embeddings'])
                               + norm(view['encoder']['kernel'])))


def loss_terms(params: dict, cf_rows: Rows, x_text: jax.Array, weights: jax.Array,
               two_hop: TwoHop, noise: Noise, scalars: dict, step,
               matmul_dtype: str = 'float32') -> LossTerms:
    """The training loss of one batch (rows weighted by `weights`, 0 on padding) at update
    `step` (1-based, the reference's `self.update` after its increment); the encoders'
    products in `matmul_dtype`."""
    s = scalars
    x_cf = cf_rows.dense
    out = forward(params, cf_rows, x_text, two_hop, noise, s['tau'], s['dropout'], matmul_dtype)
    total_weight = jnp.maximum(jnp.sum(weights), 1.0)
    mean = lambda rows: jnp.sum(weights * rows) / total_weight
    cf_ce, text_ce = mean(ce_rows(x_cf, out.cf_logits)), mean(ce_rows(x_text, out.text_logits))
    cf_kl, text_kl = mean(kl_rows(out.cf_logvar)), mean(kl_rows(out.text_logvar))
    mi = mean(mutual_information_rows(out.cf_given_text, out.text_given_cf))
    a_r = anneal(step, s['rating_anneal_cap'], s['rating_total_anneal_steps'])
    a_t = anneal(step, s['text_anneal_cap'], s['text_total_anneal_steps'])
    reg_cf = weight_norm_reg(params['cf_network'], s['item_reg'], s['prototype_reg'])
    reg_text = weight_norm_reg(params['text_network'], s['item_reg'], s['prototype_reg'])
    total = (cf_ce + a_r * cf_kl + reg_cf
             + s['lambda_text'] * (text_ce + a_t * text_kl + reg_text)
             + s['lambda_reg'] * mi)
    return LossTerms(total, cf_ce, cf_kl, text_ce, text_kl, mi, reg_cf + reg_text, a_r, a_t)


def user_factors(params: dict, frozen: Frozen, users: jax.Array, tau,
                 matmul_dtype: str = 'float32') -> jax.Array:
    """(b, K, d) evaluation-mode factors z of the users `users` ((b,) int)."""
    out = forward(params, gather_rows(frozen.ratings, users), dense_rows(frozen.words, users),
                  frozen.two_hop, None, tau, 0.0, matmul_dtype)
    return out.cf_given_text + out.text_given_cf


def score(users: jax.Array, items: dict) -> jax.Array:
    """(b, n_items) evaluation scores: the CF logits of `decode_logits` for (b, K, d) factors
    and `items` = {'embeddings' (n_items, d) unit, 'log_cates' (n_items, K), 'tau' ()}."""
    return decode_logits(users, items['embeddings'], items['log_cates'], items['tau'])


# ----------------------------------------------------------------------------------------------
# The model interface (models/base.py)
# ----------------------------------------------------------------------------------------------

def config_checks(cfg, n_users: int, n_items: int) -> list:
    """Every check of DGVAE's `model` section (fields named as in configs/dgvae.py)."""
    del n_users
    m = cfg.model
    return [
        (m.num_prototypes >= 1, 'model.num_prototypes', '>= 1'),
        (m.embedding_size >= 1, 'model.embedding_size', '>= 1'),
        (0.0 <= m.dropout < 1.0, 'model.dropout', 'in [0, 1)'),
        (m.tau > 0.0, 'model.tau', '> 0'),
        (m.std >= 0.0, 'model.std', '>= 0'),
        (m.text_std >= 0.0, 'model.text_std', '>= 0'),
        (m.rating_anneal_cap >= 0.0, 'model.rating_anneal_cap', '>= 0'),
        (m.text_anneal_cap >= 0.0, 'model.text_anneal_cap', '>= 0'),
        (m.rating_total_anneal_steps >= 0, 'model.rating_total_anneal_steps',
         '>= 0 (0: the cap from the first step)'),
        (m.text_total_anneal_steps >= 0, 'model.text_total_anneal_steps',
         '>= 0 (0: the cap from the first step)'),
        (m.lambda_text >= 0.0, 'model.lambda_text', '>= 0'),
        (m.lambda_reg >= 0.0, 'model.lambda_reg', '>= 0'),
        (m.item_reg >= 0.0, 'model.item_reg', '>= 0'),
        (m.prototype_reg >= 0.0, 'model.prototype_reg', '>= 0'),
        (1 <= m.knn_k <= n_items, 'model.knn_k', f'in [1, n_items={n_items}]'),
        (0.0 <= m.mm_image_weight <= 1.0, 'model.mm_image_weight', 'in [0, 1]'),
    ] + matmul_dtype_checks(m)


def rating_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int
                  ) -> sp.csr_matrix:
    """(n_users, n_items) float32 CSR: the number of training rows of each (user, item).

    Reproduced on purpose: the reference builds csr_matrix((ones, (uid, iid))), which sums a
    repeated row into a 2, and feeds those counts (not a 0/1 row) to the encoder and the CE."""
    ones = np.ones(len(users), np.float32)
    m = sp.csr_matrix((ones, (np.asarray(users, np.int64), np.asarray(items, np.int64))),
                      shape=(n_users, n_items))
    m.sum_duplicates()
    return m


def prepare(dataset) -> Prepared:
    """The two user matrices and the feature tables of an `MMRecDataset`."""
    if dataset.image_feat is None and dataset.text_feat is None:
        raise ValueError(f'DGVAE needs at least one feature file of dataset {dataset.name!r} '
                         '(config fields data.image_file / data.text_file, usually '
                         'image_feat.npy / text_feat.npy) for its kNN item graph; both are '
                         'absent')
    if WORDS_FIELD not in dataset.extra:
        raise ValueError(f'dataset {dataset.name!r} has no word view (data.{WORDS_FIELD}); '
                         f'build it with: {WORDS_BUILD}')
    words = sp.csr_matrix(dataset.extra[WORDS_FIELD], dtype=np.float32)
    train = dataset.train
    as32 = lambda x: None if x is None else np.asarray(x, np.float32)
    return Prepared(rating_matrix(train.users, train.items, dataset.n_users, dataset.n_items),
                    words, as32(dataset.image_feat), as32(dataset.text_feat))


def item_graph(prepared: Prepared, knn_k: int, mm_image_weight: float) -> sp.csr_matrix:
    """The frozen kNN item graph G: w * image + (1 - w) * text (float64 CSR)."""
    feats = [f for f in (prepared.image, prepared.text) if f is not None]
    weights = graph.modality_weights(prepared.image is not None, prepared.text is not None,
                                     mm_image_weight)
    return graph.knn_item_graph_scipy(feats, weights, knn_k)


def frozen_inputs(prepared: Prepared, dataset, model_cfg) -> Frozen:
    """G G of the point's (knn_k, mm_image_weight) and the two user matrices."""
    del dataset
    g = item_graph(prepared, int(model_cfg.knn_k), float(model_cfg.mm_image_weight))
    return Frozen(two_hop_rows(g), csr_rows(prepared.ratings), csr_rows(prepared.words))


def place_frozen(frozen: Frozen, partitioner, options) -> Frozen:
    """Everything replicated on every device. (`graph.spmm_impl` does not apply: the graph
    enters as the gather-scatter of `cf_encoder_input`.)"""
    del options
    return partitioner.replicate(frozen)


def create(model_cfg, n_users: int, n_items: int, layout=None) -> DgvaeNet:
    """The net. `layout` is unused: every DGVAE array is replicated (the batch's user rows are
    built on each device)."""
    del layout
    return DgvaeNet(n_users=int(n_users), n_items=int(n_items),
                    dim=int(model_cfg.embedding_size),
                    n_prototypes=int(model_cfg.num_prototypes),
                    matmul_dtype=str(model_cfg.get('matmul_dtype', 'float32')))


_init_params = jax.jit(init_params, static_argnums=(1, 2))


def init(key: jax.Array, net: DgvaeNet, frozen: Frozen, host_frozen: Frozen) -> tuple:
    """(params, carry = {'update': 0}): no step taken yet."""
    del frozen
    return (_init_params(key, net, int(host_frozen.words.n_cols)),
            {'update': jnp.zeros((), jnp.int32)})


def host_init(model_cfg) -> dict:
    del model_cfg
    return {}


def epoch_schedule(model_cfg, host: dict, epoch: int) -> tuple:
    """Every numeric field as a scalar; the annealing itself runs on the carried step count."""
    del epoch
    return host, {f: float(model_cfg[f]) for f in SCALAR_FIELDS}


def loss(net: DgvaeNet, params: dict, carry: dict, batch, frozen: Frozen, epoch_in,
         scalars: dict, rng) -> tuple:
    """(loss, carry) of one batch of user ids (`sampling.UserRowBatches` rows)."""
    del epoch_in
    step = carry['update'] + 1
    cf_rows = gather_rows(frozen.ratings, batch.users)
    x_text = dense_rows(frozen.words, batch.users)
    noise = draw_noise(rng, net, frozen.words.n_cols, batch.users.shape[0], scalars)
    terms = loss_terms(params, cf_rows, x_text, batch.weights, frozen.two_hop, noise, scalars,
                       step.astype(jnp.float32), net.matmul_dtype)
    return terms.total, {'update': step}


def eval_embeddings(net: DgvaeNet, params: dict, carry, frozen: Frozen, epoch_in, scalars,
                    eval_mode) -> tuple:
    """(users, items) for `score`: every user's evaluation-mode factors (n_users, K, d), and
    the CF view's unit item embeddings, log factor assignments (softmax) and tau."""
    del carry, epoch_in, eval_mode
    tau = scalars['tau']
    n_chunks = -(-net.n_users // EVAL_CHUNK)
    users = jnp.arange(n_chunks * EVAL_CHUNK, dtype=jnp.int32) % net.n_users
    z = jax.lax.map(lambda u: user_factors(params, frozen, u, tau, net.matmul_dtype),
                    users.reshape(n_chunks, EVAL_CHUNK))
    z = z.reshape(n_chunks * EVAL_CHUNK, net.n_prototypes, net.dim)[:net.n_users]
    _, log_cates, items = factor_assignments(params['cf_network'], tau, None)
    return z, {'embeddings': items, 'log_cates': log_cates, 'tau': jnp.asarray(tau, jnp.float32)}


def flops_per_batch(model_cfg, size: base.ProblemSize) -> float:
    """An analytic count of the FLOPs of one training step (forward and backward).

    Per view of width n (items; words = `size.input_dims[0]` when given, else items): the
    encoder's (K B, n) x (n, 2d) product and the decoder's (K B, d) x (d, n) product, each
    forward plus two gradients; for the CF view also the two-hop scatter of `cf_encoder_input`
    (the batch's training entries, B n_train / n_users on average, times at most (2 knn_k)^2
    two-hop neighbours, forward and gradient). The dropout draws, the co-attention and the
    elementwise work are left out.
    """
    d, k, b = int(model_cfg.embedding_size), int(model_cfg.num_prototypes), size.batch_size
    n_words = int(size.input_dims[0]) if getattr(size, 'input_dims', ()) else size.n_items
    dense = sum(3 * 2 * k * b * n * (2 * d + d) for n in (size.n_items, n_words))
    entries = b * size.n_train / max(1, size.n_users)
    hops = 2 * 2 * k * entries * (2 * int(model_cfg.knn_k)) ** 2
    return float(dense + hops)


MODEL = base.Model(
    name='dgvae', batch_kind='user_rows', sweep_fields=tuple(f'model.{f}' for f in SCALAR_FIELDS),
    config_checks=config_checks, static_key=base.no_static_key, prepare=prepare,
    frozen_inputs=frozen_inputs, place_frozen=place_frozen, create=create, init=init,
    host_init=host_init, epoch_schedule=epoch_schedule, epoch_inputs=base.no_epoch_inputs,
    start_epoch=base.keep_state, loss=loss, eval_embeddings=eval_embeddings,
    flops_per_batch=flops_per_batch,
    parity=base.ParityHooks(module='lirdrec_jax.parity.dgvae', reference_repo='enoche/DGVAE'),
    input_files=(base.InputFile(WORDS_FIELD, 'users', WORDS_BUILD, kind='sparse'),),
    score=score)
