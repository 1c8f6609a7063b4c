"""FREEDOM (Zhou & Shen, ACM MM 2023): a frozen item-item graph plus a degree-sensitively pruned
user-item graph over free ID embeddings, as plain functions over an explicit parameter dict.

The math, per training step:
  h      = S^{n_mm} E_i                       (S: the frozen kNN item graph, `graph.knn_item_graph`)
  X_0    = [E_u; E_i],  X_l = A~ X_{l-1}      (A~: this epoch's pruned, renormalised adjacency)
  X      = mean(X_0, ..., X_{n_ui})           (LightGCN mean, not sum)
  users  = X[:U],  items = X[U:] + h
  loss   = BPR(users, items) + reg_weight * sum_m BPR(users, P_m(F_m))
where m runs over the modalities present (text, image), F_m is the item feature table of
modality m and P_m a Linear(d_m -> embedding_size). F_m starts as the dataset's features and is
a TRAINABLE parameter (the reference's `nn.Embedding.from_pretrained(freeze=False)`); it only
receives gradients through its BPR term. Evaluation scores with a fresh forward pass on the full
normalised adjacency.

State, on the interface of `models/base.py`:
- params: `user_embedding` (U, d), `item_id_embedding` (I, d), and per modality m in
  ('image', 'text') that the dataset has: `{m}_embedding` (I, d_m), `{m}_trs` {'kernel' (d_m, d),
  'bias' (d,)}. The names are the reference's state_dict keys (Linear weights transposed).
- carry: `()`: nothing passes between steps (the reference recomputes the forward for
  evaluation). host: `{}`. scalars: `{'reg_weight'}`, so `model.reg_weight` is a sweep field;
  `model.dropout` fixes the number of kept edges, a shape, so it is not.
- frozen (host, `frozen_inputs`): the full normalised adjacency, the kNN item graph and the raw
  feature tables. The tables are only read by `init` (they become parameters, which the
  trainer places itself); `place_frozen` drops them, so they are never put on the devices a
  second time as constants.
- epoch_inputs: with `model.dropout > 0`, the epoch's pruned adjacency (BCOO), drawn from the
  training edges kept in `Prepared` (`epoch_inputs` receives `prepared`, not `frozen`); with
  `dropout == 0`, None, and the step uses the full adjacency, as the reference does.

`model.matmul_dtype = 'bfloat16'` (ours, not the reference's; default 'float32') runs the
feature projections P_m(F_m[rows]), the dominant FLOPs, with bfloat16 operands and float32
accumulation (`layers.mixed_matmul`, gradients included). The feature tables are parameters,
so they stay float32 (only the gathered rows are rounded, in the step); nothing is stored in
bfloat16.

Where the code reproduces a quirk of the reference (enoche/FREEDOM, src/models/freedom.py) on
purpose, or deliberately differs from it, a comment says so at that place.
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import graph, losses
from lirdrec_jax.models import base
from lirdrec_jax.models.layers import matmul_dtype_checks, mixed_matmul

# The order in which the reference adds the auxiliary terms (text first, then image).
MODALITIES = ('text', 'image')


class Prepared(NamedTuple):
    """Host-side inputs shared by every point of a dataset.

    Attributes:
      user_item: (U+I, U+I) BCOO, the full normalised adjacency D^-1/2 A D^-1/2 (binary A).
      edges: the distinct training pairs and their sampling weights 1/sqrt(d_u d_i) (full-graph
        degrees), as the reference's deduplicated COO interaction matrix gives them.
      image, text: (I, d_m) float32 feature tables, or None when the file is absent.
      n_users, n_items: the dataset's counts.
    """
    user_item: graph.SparseMatrix
    edges: graph.TrainEdges
    image: Optional[np.ndarray]
    text: Optional[np.ndarray]
    n_users: int
    n_items: int


class Frozen(NamedTuple):
    """A point's frozen inputs.

    Attributes:
      user_item: (U+I, U+I) the full normalised adjacency (evaluation; training with dropout 0).
      item_item: (I, I) the frozen kNN item graph of the point's (knn_k, mm_image_weight).
      image, text: (I, d_m) host feature tables for `init`, or None: absent modality, and
        always None after `place_frozen`.
    """
    user_item: graph.SparseMatrix
    item_item: graph.SparseMatrix
    image: Optional[np.ndarray] = None
    text: Optional[np.ndarray] = None


class FreedomNet(NamedTuple):
    """The static, hashable description of the computation (what `create` returns)."""
    n_users: int
    n_items: int
    dim: int = 64
    n_ui_layers: int = 2
    n_mm_layers: int = 1
    matmul_dtype: str = 'float32'  # of the feature projections (`project`)


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------

def init_params(key: jax.Array, net: FreedomNet, image: Optional[np.ndarray],
                text: Optional[np.ndarray]) -> dict:
    """Parameters initialised as the reference does: xavier_uniform ID tables, the feature
    tables copied from the data, nn.Linear's default init for the projections."""
    dims = tuple((name, table.shape[1]) for name, table in (('image', image), ('text', text))
                 if table is not None)
    params = _random_params(key, net, dims)
    for name, table in (('image', image), ('text', text)):
        if table is not None:
            params[f'{name}_embedding'] = jnp.asarray(table, jnp.float32)
    return params


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_params(key: jax.Array, net: FreedomNet, dims: tuple) -> dict:
    """The randomly initialised parameters; `dims`: ((modality, feature dim), ...).

    Every table is U(-bound, bound) with its own bound: xavier_uniform for the ID tables,
    nn.Linear's 1/sqrt(fan_in) for the projections. All of them are cut from one uniform draw
    (one random-bits kernel to compile instead of one per table; same distributions).
    """
    xavier = lambda shape: np.sqrt(6.0 / (shape[0] + shape[1]))
    specs = [(('user_embedding',), (net.n_users, net.dim), xavier((net.n_users, net.dim))),
             (('item_id_embedding',), (net.n_items, net.dim), xavier((net.n_items, net.dim)))]
    for name, d in dims:
        specs += [((f'{name}_trs', 'kernel'), (d, net.dim), 1.0 / np.sqrt(d)),
                  ((f'{name}_trs', 'bias'), (net.dim,), 1.0 / np.sqrt(d))]
    sizes = [int(np.prod(shape)) for _, shape, _ in specs]
    draw = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    params, start = {}, 0
    for (path, shape, bound), size in zip(specs, sizes):
        value = bound * draw[start:start + size].reshape(shape)
        start += size
        if len(path) == 1:
            params[path[0]] = value
        else:
            params.setdefault(path[0], {})[path[1]] = value
    return params


def modalities(params: dict) -> tuple:
    """The modalities the parameters hold a feature table for, in MODALITIES order."""
    return tuple(m for m in MODALITIES if f'{m}_embedding' in params)


def forward(net: FreedomNet, params: dict, user_item: graph.SparseMatrix,
            item_item: graph.SparseMatrix) -> tuple:
    """(users (U, d), items (I, d)) on the given user-item graph (pruned or full)."""
    h = params['item_id_embedding']
    for _ in range(net.n_mm_layers):
        h = graph.spmm(item_item, h)
    ego = jnp.concatenate([params['user_embedding'], params['item_id_embedding']], axis=0)
    total = ego
    for _ in range(net.n_ui_layers):
        ego = graph.spmm(user_item, ego)
        total = total + ego
    mean = total / (net.n_ui_layers + 1)  # FREEDOM averages the layers (LIRDRec sums them)
    return mean[:net.n_users], mean[net.n_users:] + h


def project(params: dict, modality: str, rows: jax.Array,
            matmul_dtype: str = 'float32') -> jax.Array:
    """P_m(F_m)[rows]: (n,) item ids -> (n, d), the product in `matmul_dtype`
    (`layers.mixed_matmul`).

    The reference projects the whole table and then gathers; gathering the rows first is the
    same function with the same gradients (rows not gathered get none either way), at the cost
    of the batch's rows instead of all items. The bias is kept as the reference has it, but it
    cancels in every BPR margin u.(Wp + b) - u.(Wn + b): its gradient is zero up to rounding.
    """
    trs = params[f'{modality}_trs']
    return mixed_matmul(params[f'{modality}_embedding'][rows], trs['kernel'],
                        matmul_dtype) + trs['bias']


def batch_loss(net: FreedomNet, params: dict, batch, user_item: graph.SparseMatrix,
               item_item: graph.SparseMatrix, reg_weight) -> jax.Array:
    """BPR on the propagated embeddings + reg_weight * sum over modalities of BPR(users,
    projected features). `batch`: users, positives, negatives (B,) int32, weights (B,) float32
    (0 on padding rows)."""
    users, items = forward(net, params, user_item, item_item)
    u = users[batch.users]
    ranking = losses.bpr_loss(u, items[batch.positives], items[batch.negatives], batch.weights)
    n = batch.positives.shape[0]
    both = jnp.concatenate([batch.positives, batch.negatives])
    feature_terms = 0.0
    for m in modalities(params):
        projected = project(params, m, both, net.matmul_dtype)
        feature_terms = feature_terms + losses.bpr_loss(u, projected[:n], projected[n:],
                                                        batch.weights)
    return ranking + reg_weight * feature_terms


def keep_count(n_edges: int, dropout: float) -> int:
    """How many training edges an epoch keeps: the reference's int(n * (1 - dropout)).

    Truncation in double precision, reproduced on purpose: e.g. 10 edges at dropout 0.8 keep
    int(1.9999999999999996) = 1, not 2.
    """
    return int(n_edges * (1.0 - dropout))


# Jitted once per (keep, n_users, n_items): one compiled draw per epoch instead of op-by-op.
_pruned_adjacency = jax.jit(graph.edge_dropout_adjacency, static_argnums=(2, 3, 4))


# ----------------------------------------------------------------------------------------------
# The model interface (models/base.py)
# ----------------------------------------------------------------------------------------------

def config_checks(cfg, n_users: int, n_items: int) -> list:
    """Every check of FREEDOM's `model` section (fields named as in configs/freedom.py)."""
    del n_users
    m = cfg.model
    return [
        (0.0 <= m.dropout < 1.0, 'model.dropout', 'in [0, 1) (the fraction of edges dropped)'),
        (1 <= m.knn_k <= n_items, 'model.knn_k', f'in [1, n_items={n_items}]'),
        (0.0 <= m.mm_image_weight <= 1.0, 'model.mm_image_weight', 'in [0, 1]'),
        (m.n_ui_layers >= 0, 'model.n_ui_layers', '>= 0'),
        (m.n_mm_layers >= 0, 'model.n_mm_layers', '>= 0'),
        (m.embedding_size >= 1, 'model.embedding_size', '>= 1'),
        (m.reg_weight >= 0.0, 'model.reg_weight', '>= 0'),
    ] + matmul_dtype_checks(m)


def prepare(dataset) -> Prepared:
    """The full adjacency, the sampling edges and the feature tables of an `MMRecDataset`."""
    image, text = dataset.image_feat, dataset.text_feat
    if image is None and text is None:
        # The reference asserts the same ('Features all NONE').
        raise ValueError(f'FREEDOM needs at least one feature file of dataset {dataset.name!r} '
                         '(config fields data.image_file / data.text_file, usually '
                         'image_feat.npy / text_feat.npy); both are absent')
    train = dataset.train
    as32 = lambda x: None if x is None else np.asarray(x, np.float32)
    return Prepared(
        user_item=graph.norm_adjacency(train.users, train.items, dataset.n_users,
                                       dataset.n_items),
        edges=graph.train_edges(train.users, train.items, dataset.n_users, dataset.n_items),
        image=as32(image), text=as32(text), n_users=dataset.n_users, n_items=dataset.n_items)


def item_graph(prepared: Prepared, knn_k: int, mm_image_weight: float):
    """The frozen kNN item graph: w*image + (1-w)*text with both modalities, else the one present.

    Built from the initial features (the reference builds it before any training step and
    never rebuilds it, although the feature tables then train). Not cached on disk.
    """
    return graph.modality_knn_graph(prepared.image, prepared.text, knn_k, mm_image_weight)


def frozen_inputs(prepared: Prepared, dataset, model_cfg) -> Frozen:
    del dataset
    return Frozen(prepared.user_item,
                  item_graph(prepared, int(model_cfg.knn_k), float(model_cfg.mm_image_weight)),
                  prepared.image, prepared.text)


def place_frozen(frozen: Frozen, partitioner, options) -> Frozen:
    """Both graphs in the run's sparse representation, replicated on every device. The feature
    tables are left out (None): `init` reads them from the host copy and they then live in the
    parameters."""
    graphs = [graph.spmm_operand(g, options.spmm_impl, options.spmm_chunk_size)
              for g in (frozen.user_item, frozen.item_item)]
    return Frozen(*partitioner.replicate(graphs))


def create(model_cfg, n_users: int, n_items: int, layout=None) -> FreedomNet:
    """The net. `layout` is unused: every FREEDOM array is replicated (its item features are
    parameters, and the projections run on the batch's rows only)."""
    del layout
    return FreedomNet(n_users=int(n_users), n_items=int(n_items),
                      dim=int(model_cfg.embedding_size), n_ui_layers=int(model_cfg.n_ui_layers),
                      n_mm_layers=int(model_cfg.n_mm_layers),
                      matmul_dtype=str(model_cfg.get('matmul_dtype', 'float32')))


def init(key: jax.Array, net: FreedomNet, frozen: Frozen, host_frozen: Frozen) -> tuple:
    """(params, carry=()); the feature tables come from `host_frozen` (the unplaced inputs)."""
    del frozen
    return init_params(key, net, host_frozen.image, host_frozen.text), ()


def host_init(model_cfg) -> dict:
    del model_cfg
    return {}


def epoch_schedule(model_cfg, host: dict, epoch: int) -> tuple:
    """Nothing is scheduled (the reference's learning-rate factor is 1.0, and the trainer owns
    the learning rate). Returns (host, scalars)."""
    del epoch
    return host, {'reg_weight': float(model_cfg.reg_weight)}


def epoch_inputs(prepared: Prepared, model_cfg, key: jax.Array, epoch: int):
    """The epoch's degree-sensitively pruned adjacency (the reference's pre_epoch_processing).

    keep_count(n_edges, dropout) distinct training pairs are drawn without replacement with
    probability proportional to 1/sqrt(d_u d_i) (full-graph degrees), renormalised with the kept subgraph's
    own degrees and mirrored: a (U+I, U+I) BCOO with 2 * keep entries. None with dropout 0:
    the step then uses the full adjacency of `Frozen`, as the reference does.
    """
    del epoch  # `key` is already the point's key folded with the epoch
    dropout = float(model_cfg.dropout)
    if dropout <= 0.0:
        return None
    n_edges = int(prepared.edges.users.shape[0])
    keep = keep_count(n_edges, dropout)
    if keep < 1:
        raise ValueError(f'config field model.dropout = {dropout!r} keeps int({n_edges} * '
                         f'(1 - {dropout!r})) = {keep} of the {n_edges} training edges; '
                         'expected a dropout that keeps at least one')
    return _pruned_adjacency(key, prepared.edges, keep, prepared.n_users, prepared.n_items)


def _train_graph(frozen: Frozen, epoch_in):
    return frozen.user_item if epoch_in is None else epoch_in


def loss(net: FreedomNet, params: dict, carry, batch, frozen: Frozen, epoch_in, scalars: dict,
         rng) -> tuple:
    """(loss, carry) of one batch on the epoch's (pruned) graph; see `batch_loss`."""
    del rng
    value = batch_loss(net, params, batch, _train_graph(frozen, epoch_in), frozen.item_item,
                       scalars['reg_weight'])
    return value, carry


def eval_embeddings(net: FreedomNet, params: dict, carry, frozen: Frozen, epoch_in, scalars,
                    eval_mode) -> tuple:
    """A fresh forward pass on the FULL normalised adjacency (the reference's full_sort_predict;
    never the epoch's pruned graph). The evaluation options change nothing here."""
    del carry, epoch_in, scalars, eval_mode
    return forward(net, params, frozen.user_item, frozen.item_item)


def flops_per_batch(model_cfg, size: base.ProblemSize) -> float:
    """An analytic count of the FLOPs of one training step (forward and backward).

    Counts: the kNN propagation (n_items * knn_k entries), the user-item propagation over the
    kept edges (2 entries per kept training row), and the projections of the batch's positive
    and negative rows of every feature table: forward, kernel gradient and table-row gradient.
    Adam's elementwise work (over the trainable feature tables too) is left out.
    """
    d = int(model_cfg.embedding_size)
    dropout = float(model_cfg.dropout)
    kept_entries = 2 * (keep_count(size.n_train, dropout) if dropout > 0 else size.n_train)
    # Each sparse product: 2 FLOPs per entry and column, once forward, once for the gradient.
    propagation = 2 * 2 * d * (int(model_cfg.n_mm_layers) * size.n_items * int(model_cfg.knn_k)
                               + int(model_cfg.n_ui_layers) * kept_entries)
    rows = 2 * size.batch_size
    projections = sum(3 * 2 * rows * int(f) * d for f in size.feature_dims)
    return float(propagation + projections)


MODEL = base.Model(
    name='freedom', batch_kind='bpr', sweep_fields=('model.reg_weight',),
    config_checks=config_checks, static_key=base.no_static_key, prepare=prepare,
    frozen_inputs=frozen_inputs, place_frozen=place_frozen, create=create, init=init,
    host_init=host_init, epoch_schedule=epoch_schedule, epoch_inputs=epoch_inputs,
    start_epoch=base.keep_state, loss=loss, eval_embeddings=eval_embeddings,
    flops_per_batch=flops_per_batch,
    parity=base.ParityHooks(module='lirdrec_jax.parity.freedom', reference_repo='enoche/FREEDOM'))
