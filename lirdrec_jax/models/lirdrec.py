"""LIRDRec (arXiv 2505.04960): a pure Flax module and its functions on the model interface.

The forward pass returns everything the next step needs (user and item representations and
the fusion attention) instead of stashing it on the module, as the reference does with
`result_embed` and `last_att`. The state the reference keeps in module attributes is explicit
here (`MODEL` at the end wires it into the generic trainer):
- `Carry.attention` is the fusion attention of the last training batch; at the start of the
  next epoch it overwrites the PWC table theta (the reference's `theta.data = last_att`,
  `start_epoch`).
- `Carry.user_emb/item_emb` are the representations of the last training forward pass,
  computed before that batch's optimiser step; the reference evaluates on exactly these (its
  cached `result_embed`). `eval.embeddings = 'fresh'` evaluates on a new forward pass instead.
- The host state holds the PWC weights w1/w2 (`epoch_schedule`).
"""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from flax import linen as nn

from lirdrec_jax import graph, losses, parallel
from lirdrec_jax.models import base
from lirdrec_jax.models.layers import (MATMUL_DTYPES, Tower, TorchDense, l2_normalize,
                                       xavier_normal_init)

VIEWS = ('image', 'text', 'spectral')


class ItemFeatures(NamedTuple):
    """Frozen item features, computed once.

    Attributes:
      image: (n_items, d_v) float32 (or bfloat16, see `feature_layout`).
      text: (n_items, d_t).
      spectral: (n_items, d_v + d_t), [DCT(image), DCT(text)] (orthonormal DCT-II of each
        modality along the feature axis, concatenated image first as the reference does).
      image_t, text_t, spectral_t: optional transposed copies, (d, n_items); when present the
        towers' first layers use them for their weight gradients (`layers.frozen_input_matmul`).
    Rows beyond n_items (padding added to split items evenly over devices) are ignored.
    """
    image: jax.Array
    text: jax.Array
    spectral: jax.Array
    image_t: Optional[jax.Array] = None
    text_t: Optional[jax.Array] = None
    spectral_t: Optional[jax.Array] = None

    def views(self) -> tuple:
        """((x, x_t) per view, in VIEWS order); x_t is None without transposed copies."""
        return ((self.image, self.image_t), (self.text, self.text_t),
                (self.spectral, self.spectral_t))


def dct_ortho(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II along the last axis (torch_dct.dct(x, norm='ortho')), in float64."""
    return scipy.fft.dct(np.asarray(x, np.float64), type=2, norm='ortho', axis=-1)


def item_features(image: np.ndarray, text: np.ndarray) -> ItemFeatures:
    """Build the three frozen inputs of the towers (the DCT is computed here, once)."""
    if image is None or text is None:
        missing = 'image_feat.npy' if image is None else 'text_feat.npy'
        raise ValueError(f'LIRDRec needs both image and text features; {missing} is absent '
                         '(its third view is the DCT of both modalities concatenated)')
    spectral = np.concatenate([dct_ortho(image), dct_ortho(text)], axis=1)
    return ItemFeatures(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                        jnp.asarray(spectral, jnp.float32))


def feature_layout(features: ItemFeatures, matmul_dtype: str, transposed: bool) -> ItemFeatures:
    """The features as the towers will read them (placement is up to the caller): float32 as
    given, or copies in bfloat16 (`matmul_dtype`), with transposed copies when `transposed`.
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f'config field model.matmul_dtype = {matmul_dtype!r}; expected one of '
                         f'{MATMUL_DTYPES}')
    if not (transposed or matmul_dtype == 'bfloat16'):
        return ItemFeatures(*features[:3])  # as given: no copy
    dtype = jnp.bfloat16 if matmul_dtype == 'bfloat16' else jnp.float32
    base = [jnp.asarray(x, dtype) for x in features[:3]]
    if not transposed:
        return ItemFeatures(*base)
    return ItemFeatures(*base, *(_transposed(x) for x in base))


def wants_transposed(model_cfg) -> bool:
    """Whether the towers get transposed feature copies: with `model.transposed_features`, and
    on the CPU always with bfloat16 (XLA:CPU's bfloat16 weight gradient is fast only from the
    transposed copy: 22 vs 39 ms, docs/performance.md). Off the CPU never: GPU and TPU compilers
    choose their own layouts, and the copies would double the features' device memory."""
    if parallel.platform() != 'cpu':
        return False
    return (bool(model_cfg.get('transposed_features', False))
            or str(model_cfg.get('matmul_dtype', 'float32')) == 'bfloat16')


@jax.jit
def _transposed(x: jax.Array) -> jax.Array:
    return x.T  # a materialised (d, n) copy: row-major, so x_t @ g contracts its minor axis


class Graphs(NamedTuple):
    """The sparse matrices of one forward pass.

    Attributes:
      user_item: (n_users+n_items, n_users+n_items) normalised adjacency (or its dropout sample).
      item_item: (n_items, n_items) frozen kNN item graph.
    Either may be a BCOO matrix or a `graph.ChunkedCoo` (see `graph.spmm_operand`).
    """
    user_item: graph.SparseMatrix
    item_item: graph.SparseMatrix


class WeightCopy(nn.Module):
    """Per-view score: Linear(dim -> dim/4) -> leaky_relu -> Linear(dim/4 -> 1). (n, dim) -> (n, 1)."""
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.leaky_relu(TorchDense(self.hidden, name='fc1')(x), negative_slope=0.01)
        return TorchDense(1, name='fc2')(h)


class ProgressiveWeightCopy(nn.Module):
    """PWC fusion of the three user views.

    attention = softmax(w1 * [a(v), b(t), c(s)] + w2 * theta) per user; the fused user vector is
    [att_0 v, att_1 t, att_2 s]. w1 and w2 are scalars scheduled across epochs by the training
    loop (`pwc_weights_for_epoch`), theta is a trainable (n_users, 3) table that the loop
    overwrites with the previous epoch's last attention.
    """
    n_users: int
    dim: int

    @nn.compact
    def __call__(self, views, w1, w2):
        theta = self.param('theta', xavier_normal_init, (self.n_users, 3))
        scores = jnp.concatenate(
            [WeightCopy(self.dim // 4, name=f'weco_{n}')(v) for n, v in zip('abc', views)], axis=1)
        attention = jax.nn.softmax(w1 * scores + w2 * theta, axis=1)
        fused = jnp.concatenate([attention[:, i:i + 1] * v for i, v in enumerate(views)], axis=1)
        return fused, attention


class LIRDRec(nn.Module):
    """LIRDRec forward: (features, graphs, w1, w2) -> (users (n_users, 3*dim),
    items (n_items, 3*dim), attention (n_users, 3)).

    `layout` (from `parallel.Partitioner.layout_hook`, None on one device) pins where the
    towers' work runs: their outputs stay split by item like the features (each device runs
    the towers on its items only), the stacked embeddings are then replicated for the graph
    propagation. The model itself knows nothing about devices.
    """
    n_users: int
    n_items: int
    dim: int = 64
    n_ui_layers: int = 2
    n_mm_layers: int = 1
    matmul_dtype: str = 'float32'  # of the towers' first layers; see layers.frozen_input_matmul
    layout: Optional[Callable[[jax.Array, str], jax.Array]] = None

    def _place(self, x: jax.Array, kind: str) -> jax.Array:
        return x if self.layout is None else self.layout(x, kind)

    @nn.compact
    def __call__(self, features: ItemFeatures, graphs: Graphs, w1, w2):
        prefs = [self.param(f'{name}_preference', xavier_normal_init, (self.n_users, self.dim))
                 for name in VIEWS]
        # [:n_items] drops the padding rows of features split over devices (a no-op otherwise).
        towers = [self._place(Tower(self.dim, self.matmul_dtype, name=f'{name}_tower')(x, x_t),
                              'items')[:self.n_items]
                  for name, (x, x_t) in zip(VIEWS, features.views())]
        # Each view's users and items are stacked, then L2-normalised row-wise per 64-d block.
        ego = jnp.concatenate([l2_normalize(jnp.concatenate([p, t], axis=0))
                               for p, t in zip(prefs, towers)], axis=1)
        ego = self._place(ego, 'replicated')
        total = ego
        for _ in range(self.n_ui_layers):
            ego = graph.spmm(graphs.user_item, ego)
            total = total + ego
        users, items = total[:self.n_users], total[self.n_users:]

        views = [users[:, i * self.dim:(i + 1) * self.dim] for i in range(3)]
        users, attention = ProgressiveWeightCopy(self.n_users, self.dim, name='fusion')(
            views, w1, w2)

        h = items
        for _ in range(self.n_mm_layers):
            h = graph.spmm(graphs.item_item, h)
        return users, items + h, attention


def pwc_weights_for_epoch(w1: float, w2: float, epoch: int, base: float) -> tuple:
    """The reference's compounding PWC schedule, applied at the start of epoch `epoch` (1-based).

    w1 <- w1 * base**epoch, then both renormalised to sum to one. The decay compounds because
    the previous epoch's (already decayed) w1 is the input. Computed in Python floats (double),
    as the reference does.
    """
    w1 = w1 * base ** epoch
    total = w1 + w2
    return w1 / total, w2 / total


# ----------------------------------------------------------------------------------------------
# The model interface (models/base.py)
# ----------------------------------------------------------------------------------------------

class Prepared(NamedTuple):
    """Host-side inputs shared by every point of a dataset.

    Attributes:
      features: the three frozen views (float32, the DCT computed once).
      user_item: the normalised user-item adjacency (BCOO).
      edges: the training edges and their sampling weights (for `model.dropout > 0`).
      image, text: the raw feature tables (numpy or None), for the kNN item graph.
      n_users, n_items: the dataset's counts.
    """
    features: ItemFeatures
    user_item: graph.SparseMatrix
    edges: graph.TrainEdges
    image: Optional[np.ndarray]
    text: Optional[np.ndarray]
    n_users: int
    n_items: int


class Frozen(NamedTuple):
    """A point's frozen inputs: the views (in the point's dtype and layout), the full
    normalised adjacency and the kNN item graph."""
    features: ItemFeatures
    user_item: graph.SparseMatrix
    item_item: graph.SparseMatrix


class Carry(NamedTuple):
    """What one step hands to the next (module docstring).

    Attributes:
      attention: (n_users, 3) fusion attention of the last training forward.
      user_emb: (n_users, 3*dim) users of the last training forward.
      item_emb: (n_items, 3*dim) items of the last training forward.
    """
    attention: jax.Array
    user_emb: jax.Array
    item_emb: jax.Array


EVAL_EMBEDDINGS = ('last_batch', 'fresh')


def config_checks(cfg, n_users: int, n_items: int) -> list:
    del n_users
    m = cfg.model
    return [
        (cfg.eval.embeddings in EVAL_EMBEDDINGS, 'eval.embeddings', f'one of {EVAL_EMBEDDINGS}'),
        (0.0 <= m.dropout < 1.0, 'model.dropout', 'in [0, 1)'),
        (1 <= m.knn_k <= n_items, 'model.knn_k', f'in [1, n_items={n_items}]'),
        (0.0 <= m.mm_image_weight <= 1.0, 'model.mm_image_weight', 'in [0, 1]'),
        (0.0 <= m.decay_weight <= 1.0, 'model.decay_weight', 'in [0, 1]'),
        (m.n_ui_layers >= 0 and m.n_mm_layers >= 0, 'model.n_*_layers', '>= 0'),
        (m.get('matmul_dtype', 'float32') in MATMUL_DTYPES, 'model.matmul_dtype',
         f'one of {MATMUL_DTYPES}'),
        (not (m.get('cpu_dot', 'xla') == 'eigen'
              and m.get('matmul_dtype', 'float32') == 'bfloat16'), 'model.cpu_dot',
         "'xla' with model.matmul_dtype='bfloat16' (Eigen has no fast bfloat16 GEMM: the "
         "towers ran 3.5x slower)"),
    ]


def static_key(model_cfg) -> str:
    # The kNN graph's entries are the union of both modalities' neighbours for weights strictly
    # between 0 and 1; a weight of 0 or 1 drops one modality's entries (other shapes).
    w = float(model_cfg.mm_image_weight)
    return 'text' if w == 0.0 else 'image' if w == 1.0 else 'both'


def prepare(dataset) -> Prepared:
    train = dataset.train
    return Prepared(
        features=item_features(dataset.image_feat, dataset.text_feat),
        user_item=graph.norm_adjacency(train.users, train.items, dataset.n_users,
                                       dataset.n_items),
        edges=graph.train_edges(train.users, train.items, dataset.n_users, dataset.n_items),
        image=dataset.image_feat, text=dataset.text_feat, n_users=dataset.n_users,
        n_items=dataset.n_items)


def item_graph(prepared: Prepared, knn_k: int, mm_image_weight: float):
    """The frozen kNN item graph of one (knn_k, mm_image_weight) point (seconds to build)."""
    return graph.modality_knn_graph(prepared.image, prepared.text, knn_k, mm_image_weight)


def frozen_inputs(prepared: Prepared, dataset, model_cfg) -> Frozen:
    del dataset
    features = feature_layout(prepared.features, str(model_cfg.get('matmul_dtype', 'float32')),
                              wants_transposed(model_cfg))
    return Frozen(features, prepared.user_item,
                  item_graph(prepared, int(model_cfg.knn_k), float(model_cfg.mm_image_weight)))


def place_frozen(frozen: Frozen, partitioner, options) -> Frozen:
    """Features split by item over the devices (rows; transposed copies by column), graphs in
    the run's sparse representation, replicated."""
    f = frozen.features
    features = ItemFeatures(*[partitioner.split_items(x, 0) for x in f[:3]],
                            *[partitioner.split_items(x, 1) for x in f[3:]])
    graphs = [graph.spmm_operand(g, options.spmm_impl, options.spmm_chunk_size)
              for g in (frozen.user_item, frozen.item_item)]
    return Frozen(features, *partitioner.replicate(graphs))


def create(model_cfg, n_users: int, n_items: int, layout=None) -> 'LIRDRec':
    return LIRDRec(n_users=n_users, n_items=n_items, dim=int(model_cfg.embedding_size),
                   n_ui_layers=int(model_cfg.n_ui_layers), n_mm_layers=int(model_cfg.n_mm_layers),
                   matmul_dtype=str(model_cfg.get('matmul_dtype', 'float32')), layout=layout)


def _graphs(frozen: Frozen, epoch_inputs) -> Graphs:
    user_item = frozen.user_item if epoch_inputs is None else epoch_inputs
    return Graphs(user_item, frozen.item_item)


def init(key, net: 'LIRDRec', frozen: Frozen, host_frozen: Frozen) -> tuple:
    del host_frozen
    params = net.init(key, frozen.features, _graphs(frozen, None), 1.0, 0.0)['params']
    theta = params['fusion']['theta']
    # Before any forward pass the reference's `last_att` is theta itself, so the overwrite at
    # the start of epoch 1 changes nothing; starting `attention` at theta reproduces that.
    width = 3 * net.dim
    return params, Carry(theta, jnp.zeros((net.n_users, width), jnp.float32),
                         jnp.zeros((net.n_items, width), jnp.float32))


def host_init(model_cfg) -> dict:
    w1 = float(model_cfg.decay_weight)
    return {'w1': w1, 'w2': 1.0 - w1}


def epoch_schedule(model_cfg, host: dict, epoch: int) -> tuple:
    """The PWC schedule applied at the start of `epoch` (0-based; the reference's
    pre_epoch_processing). Returns (host, scalars)."""
    w1, w2 = pwc_weights_for_epoch(host['w1'], host['w2'], epoch + 1, float(model_cfg.decay_base))
    return {'w1': w1, 'w2': w2}, {'w1': w1, 'w2': w2, 'reg_weight': float(model_cfg.reg_weight)}


def epoch_inputs(prepared: Prepared, model_cfg, key, epoch: int):
    """The user-item graph of one epoch: None (the full adjacency of `Frozen`), or with
    `model.dropout > 0` a degree-sensitive dropout sample (FREEDOM's, inactive in the
    reference's LIRDRec settings)."""
    del epoch
    dropout = float(model_cfg.dropout)
    if dropout <= 0.0:
        return None
    keep = int(prepared.edges.users.shape[0] * (1.0 - dropout))
    return graph.edge_dropout_adjacency(key, prepared.edges, keep, prepared.n_users,
                                        prepared.n_items)


def with_theta(params, theta):
    """params with the PWC table replaced (a new dict; nothing is mutated)."""
    return {**params, 'fusion': {**params['fusion'], 'theta': theta}}


def start_epoch(params, carry: Carry) -> tuple:
    """theta <- the last batch's attention; Adam's moments of theta are kept, as in the
    reference. The steps never read the incoming attention (each overwrites it), so the carry
    restarts from zeros: theta and the carry then never share a buffer."""
    return with_theta(params, carry.attention), carry._replace(
        attention=jnp.zeros_like(carry.attention))


def loss(net: 'LIRDRec', params, carry: Carry, batch, frozen: Frozen, epoch_in, scalars: dict,
         rng) -> tuple:
    """BPR over the batch + reg_weight * (mean(U^2) + mean(I^2)) over all users and items."""
    del carry, rng
    users, items, attention = net.apply({'params': params}, frozen.features,
                                        _graphs(frozen, epoch_in), scalars['w1'], scalars['w2'])
    ranking = losses.bpr_loss(users[batch.users], items[batch.positives],
                              items[batch.negatives], batch.weights)
    value = ranking + scalars['reg_weight'] * losses.embedding_l2(users, items)
    return value, Carry(attention, users, items)


def eval_embeddings(net: 'LIRDRec', params, carry: Carry, frozen: Frozen, epoch_in,
                    scalars: dict, mode: str) -> tuple:
    """The last training forward's embeddings (the reference), or a fresh forward pass."""
    if mode == 'last_batch':
        return carry.user_emb, carry.item_emb
    users, items, _ = net.apply({'params': params}, frozen.features, _graphs(frozen, epoch_in),
                                scalars['w1'], scalars['w2'])
    return users, items


def flops_per_batch(model_cfg, size: base.ProblemSize) -> float:
    """Forward + weight-gradient FLOPs of the three towers over all items (the dominant cost;
    the features are constants, so there are no input gradients)."""
    dim = int(model_cfg.embedding_size)
    dims = list(size.feature_dims) + [sum(size.feature_dims)]
    per = sum(2 * size.n_items * (d * 4 * dim + 4 * dim * dim) for d in dims)
    return 2 * per


MODEL = base.Model(
    name='lirdrec', batch_kind='bpr',
    sweep_fields=('model.reg_weight', 'model.decay_weight', 'model.decay_base',
                  'model.mm_image_weight'),
    config_checks=config_checks, static_key=static_key, prepare=prepare,
    frozen_inputs=frozen_inputs, place_frozen=place_frozen, create=create, init=init,
    host_init=host_init, epoch_schedule=epoch_schedule, epoch_inputs=epoch_inputs,
    start_epoch=start_epoch, loss=loss, eval_embeddings=eval_embeddings,
    flops_per_batch=flops_per_batch,
    parity=base.ParityHooks(module='lirdrec_jax.parity.lirdrec', reference_repo='enoche/LIRDRec'))
