"""CM3 (arXiv 2508.01226): a pure Flax module and its functions on the model interface.

The math, per training step (reference: enoche/CM3, src/models/cm3.py):
  f_v = Tower_v(v), f_t = Tower_t(t)                  (d -> 256 leaky_relu -> 64, as LIRDRec's)
  p_t = l2(W_t t + b_t), p_v = l2(W_v v + b_v)        (xavier_normal weights)
  mix = slerp(p_t, p_v; lambda_i),  lambda_i ~ Beta(alpha, alpha) per item, drawn every forward
  X_0 = [l2([P_v; f_v]) | l2([P_t; f_t]) | l2([P_m; mix])]     ((U+I) x 3*64)
  X   = X_0 + A X_0 + ... + A^L X_0                   (LightGCN SUM over layers, L = n_ui_layers)
  users = [a_0 X_v | a_1 X_t | a_2 X_m][:U],  a = softmax(theta_u) over the 3 views
  items = X[U:] + S^{n_mm} X[U:]                      (S: the frozen kNN item graph)
  loss  = align(u, i+) + gamma/2 [unif(u) + calibrated_unif(i-, s)]
on the L2-normalised u, i+, i- of the batch, with s_jk = clamp(cos(mix_j, mix_k), min_sim,
max_sim) over the batch's negatives (gradients flow through s). No BPR, no L2 term.

The state the reference keeps in module attributes is explicit here (`MODEL` at the end wires
it into the generic trainer):
- `Carry.user_emb/item_emb`: the UNNORMALISED representations of the last training forward,
  computed before that batch's optimiser step, random lambdas included; the reference
  evaluates on exactly these (its cached `result_embed`). `eval.embeddings = 'fresh'` evaluates
  on a new forward pass with the current parameters instead, at lambda = 1/2 for every item
  (the mean of Beta(alpha, alpha)), so that evaluation itself draws no noise.
- The lambdas come from the `rng` the trainer passes to `loss`; `forward`/`loss_with_mix_weights`
  take them explicitly (the parity command feeds the reference's own draws through them).

`model.matmul_dtype = 'bfloat16'` (ours, not the reference's; default 'float32') stores the
image and text features in bfloat16 (rounded once, in `frozen_inputs`: half the bytes) and
runs the products that read them, the towers' first layers and the two projections (the
dominant FLOPs), with bfloat16 operands and float32 accumulation (`layers.mixed_matmul`);
parameters, the rest of the forward pass and the loss stay float32.

Where the code reproduces a quirk of the reference on purpose, or deliberately differs from it,
a comment says so at that place.
"""
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lirdrec_jax import graph
from lirdrec_jax.models import base
from lirdrec_jax.models.layers import (Tower, TorchDense, l2_normalize, matmul_dtype_checks,
                                       matmul_input_dtype, torch_linear_bias_init,
                                       xavier_normal_init)

VIEWS = ('image', 'text', 'mix')
# Temperature of the alignment-uniformity losses (the reference's default t = 2).
UNIFORMITY_T = 2.0
EVAL_EMBEDDINGS = ('last_batch', 'fresh')


class Graphs(NamedTuple):
    """The sparse matrices of one forward pass.

    Attributes:
      user_item: (U+I, U+I) normalised adjacency (BCOO or `graph.ChunkedCoo`).
      item_item: (I, I) frozen kNN item graph.
    """
    user_item: graph.SparseMatrix
    item_item: graph.SparseMatrix


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------

def torch_clamp(x: jax.Array, lo, hi) -> jax.Array:
    """clip(x, lo, hi) with torch.clamp's gradient: 1 where lo <= x <= hi (bounds included), 0
    outside. (jnp.clip gives 1/2 at a bound; a negative drawn twice has cos = 1 with itself up
    to rounding, the `max_sim` bound of half the reference's grid.)"""
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, x, jnp.clip(x, lo, hi))


def slerp(p_text: jax.Array, p_image: jax.Array, lam: jax.Array) -> jax.Array:
    """Spherical interpolation of unit rows: sin(lam th)/sin(th) p_text + sin((1-lam) th)/sin(th)
    p_image, th = acos(p_text . p_image) (the reference's weights: lam goes with the text).

    Deliberate difference (quirk CD1): the reference clamps the cosine to [-1+1e-8, 1-1e-8],
    which in float32 is [-1, 1] (1 - 1e-8 rounds to 1), so parallel rows get acos(1) = 0 and
    0/0 = NaN, and the NaN loss ends its training. Here a row whose clamped cosine is 1 takes
    the limit of the two weights instead, written to second order in 1 - cos
    (sin(c th)/sin(th) = c (1 + (1 - c^2) th^2 / 6), th^2 = 2 (1 - cos) + ...): the values lam
    and 1 - lam, and the limit of the gradient. Every other row computes the reference's formula
    (the smallest positive float32 angle acos returns is 3.5e-4, where the formula is exact to
    rounding), so the two agree wherever the reference is finite. Antiparallel rows (cos = -1)
    keep the reference's finite but huge weights (sin(pi) = -8.7e-8 in float32): slerp has no
    limit there.

    Args:
      p_text, p_image: (n, d) L2-normalised rows.
      lam: (n,) interpolation weights in [0, 1].
    """
    cos = torch_clamp(jnp.sum(p_text * p_image, axis=1), -1.0, 1.0)
    parallel = cos >= 1.0
    # acos at a safe point on the parallel rows, so that its infinite slope at 1 never meets
    # the zero cotangent of the unused branch (0 * inf = NaN).
    angle = jnp.arccos(jnp.where(parallel, 0.0, cos))
    sin_angle = jnp.sin(angle)
    gap = 1.0 - cos
    weights = []
    for c in (lam, 1.0 - lam):
        formula = jnp.sin(c * angle) / sin_angle
        limit = c * (1.0 + (1.0 - c * c) * gap / 3.0)
        weights.append(jnp.where(parallel, limit, formula))
    return weights[0][:, None] * p_text + weights[1][:, None] * p_image


def draw_mix_weights(rng: jax.Array, alpha, n_items: int) -> jax.Array:
    """lambda_i ~ Beta(alpha, alpha), one per item: (n_items,) float32. `alpha` may be traced
    (a sweep field)."""
    return jax.random.beta(rng, alpha, alpha, (n_items,), jnp.float32)


class CM3(nn.Module):
    """CM3 forward: (image (I', d_v), text (I', d_t), graphs, mix_weights (I,)) ->
    (users (U, 3*dim), items (I, 3*dim), mix (I, dim)), all unnormalised as the reference's
    `result_embed` (the loss normalises them). I' >= I: rows beyond n_items are padding of
    features split over devices.

    `matmul_dtype` is the dtype of the products that read the features (the towers' first
    layers and the projections; the features are then bfloat16 too, see `frozen_inputs`).
    `layout` (from `parallel.Partitioner.layout_hook`, None on one device) keeps the towers'
    and projections' work split by item like the features; the stacked embeddings are then
    replicated for the propagation.
    """
    n_users: int
    n_items: int
    dim: int = 64
    n_ui_layers: int = 3
    n_mm_layers: int = 1
    matmul_dtype: str = 'float32'
    layout: Optional[Callable[[jax.Array, str], jax.Array]] = None

    def _items(self, x: jax.Array) -> jax.Array:
        x = x if self.layout is None else self.layout(x, 'items')
        return x[:self.n_items]

    def _projection(self, x: jax.Array, name: str) -> jax.Array:
        # nn.Linear(d, dim) with xavier_normal_ weight (set by the reference after construction)
        # and nn.Linear's default bias. In bfloat16, the same parameters through
        # `layers.mixed_matmul` (nn.Dense would promote bfloat16 features to float32).
        if self.matmul_dtype == 'float32':
            dense = nn.Dense(self.dim, kernel_init=xavier_normal_init,
                             bias_init=torch_linear_bias_init(x.shape[-1]), name=name)
        else:
            dense = TorchDense(self.dim, matmul_dtype=self.matmul_dtype,
                               kernel_init=xavier_normal_init, name=name)
        return self._items(dense(x))

    @nn.compact
    def __call__(self, image: jax.Array, text: jax.Array, graphs: Graphs,
                 mix_weights: jax.Array):
        prefs = [self.param(f'{name}_preference', xavier_normal_init, (self.n_users, self.dim))
                 for name in VIEWS]
        towers = [self._items(Tower(self.dim, self.matmul_dtype, name=f'{name}_tower')(x))
                  for name, x in (('image', image), ('text', text))]
        p_text = l2_normalize(self._projection(text, 'text_projection'))
        p_image = l2_normalize(self._projection(image, 'image_projection'))
        mix = slerp(p_text, p_image, mix_weights)
        ego = jnp.concatenate([l2_normalize(jnp.concatenate([p, t], axis=0))
                               for p, t in zip(prefs, towers + [mix])], axis=1)
        if self.layout is not None:
            ego = self.layout(ego, 'replicated')
        total = ego
        for _ in range(self.n_ui_layers):
            ego = graph.spmm(graphs.user_item, ego)
            total = total + ego
        users, items = total[:self.n_users], total[self.n_users:]
        # Static user fusion: softmax over the views of a learned (U, 3, 1) table (its shape is
        # the reference's, so that its xavier_normal_ fans are 3 and U).
        theta = self.param('theta', xavier_normal_init, (self.n_users, 3, 1))
        attention = jax.nn.softmax(theta, axis=1)
        users = jnp.concatenate([attention[:, i] * users[:, i * self.dim:(i + 1) * self.dim]
                                 for i in range(3)], axis=1)
        h = items
        for _ in range(self.n_mm_layers):
            h = graph.spmm(graphs.item_item, h)
        return users, items + h, mix


def pair_mask(weights: jax.Array) -> jax.Array:
    """(B, B) float32: 1 for the pairs j < k of real rows (weight > 0), the pairs torch.pdist
    and torch.combinations enumerate over the reference's (shorter) last batch; 0 for the rest
    and for every pair with a padding row. Repeated rows are distinct rows: a user twice in
    the batch makes a pair at distance 0, counted as the reference counts it."""
    real = (weights > 0).astype(jnp.float32)
    upper = jnp.triu(jnp.ones((weights.shape[0],) * 2, jnp.float32), k=1)
    return upper * real[:, None] * real[None, :]


def squared_distances(x: jax.Array) -> jax.Array:
    """(B, d) -> (B, B) ||x_j - x_k||^2 from the Gram matrix (no (B, B, d) tensor)."""
    sq = jnp.sum(x * x, axis=1)
    return sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)


def log_mean_over_pairs(values: jax.Array, mask: jax.Array) -> jax.Array:
    """log of the mean of `values` over the masked pairs.

    Deliberate difference (quirk CD2): with fewer than two real rows there is no pair; the
    reference's mean over an empty pdist is NaN (a last batch of one row ends its training).
    The term is 0 here.
    """
    count = jnp.sum(mask)
    mean = jnp.sum(values * mask) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, jnp.log(jnp.where(count > 0, mean, 1.0)), 0.0)


def alignment(users: jax.Array, positives: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over real rows of ||u - i+||^2 (the reference's norm(p=2)**2: the same value, and at
    u = i+ the same zero gradient)."""
    sq = jnp.sum((users - positives) ** 2, axis=1)
    return jnp.sum(weights * sq) / jnp.sum(weights)


def uniformity(x: jax.Array, mask: jax.Array, t: float = UNIFORMITY_T) -> jax.Array:
    """log mean_{j<k} exp(-t ||x_j - x_k||^2) over the masked pairs."""
    return log_mean_over_pairs(jnp.exp(-t * squared_distances(x)), mask)


def cosine_similarities(x: jax.Array) -> jax.Array:
    """(B, d) -> (B, B) cosines of the rows (rows divided by their norms, then the Gram)."""
    unit = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


def calibrated_uniformity(x: jax.Array, sim: jax.Array, mask: jax.Array,
                          t: float = UNIFORMITY_T) -> jax.Array:
    """log mean_{j<k} exp(-t (||x_j - x_k||^2 - 2 + 2 s_jk)) over the masked pairs: pairs whose
    multimodal similarity s is high are pushed apart less."""
    return log_mean_over_pairs(jnp.exp(-t * (squared_distances(x) - 2.0 + 2.0 * sim)), mask)


def cm3_loss(users, positives, negatives, negative_mix, weights, gamma, min_sim, max_sim):
    """The CM3 objective of one batch.

    Args:
      users, positives, negatives: (B, d) L2-normalised gathered representations.
      negative_mix: (B, dim) the negatives' slerp mixes (unnormalised).
      weights: (B,) 1 for real rows, 0 for padding rows, which enter no mean.
      gamma, min_sim, max_sim: scalars (may be traced).
    """
    mask = pair_mask(weights)
    sim = torch_clamp(cosine_similarities(negative_mix), min_sim, max_sim)
    uniform = uniformity(users, mask) + calibrated_uniformity(negatives, sim, mask)
    return alignment(users, positives, weights) + gamma * uniform / 2.0


# ----------------------------------------------------------------------------------------------
# The model interface (models/base.py)
# ----------------------------------------------------------------------------------------------

class Prepared(NamedTuple):
    """Host-side inputs shared by every point of a dataset.

    Attributes:
      image, text: (I, d_m) float32 feature tables (both required).
      user_item: the normalised user-item adjacency (BCOO).
      n_users, n_items: the dataset's counts.
    """
    image: np.ndarray
    text: np.ndarray
    user_item: graph.SparseMatrix
    n_users: int
    n_items: int


class Frozen(NamedTuple):
    """A point's frozen inputs.

    Attributes:
      image, text: (I', d_m) the features (split by item over the devices once placed),
        float32, or bfloat16 with `model.matmul_dtype = 'bfloat16'`. They are constants:
        the reference registers trainable copies (`image_embedding`, `text_embedding`) but its
        forward pass reads the raw tables, so those copies never get a gradient (quirk CR4).
      user_item: (U+I, U+I) the normalised adjacency.
      item_item: (I, I) the kNN item graph of the point's (knn_k, mm_image_weight).
    """
    image: jax.Array
    text: jax.Array
    user_item: graph.SparseMatrix
    item_item: graph.SparseMatrix


class Carry(NamedTuple):
    """What one step hands to the next: the last training forward's unnormalised users
    (U, 3*dim) and items (I, 3*dim), which the reference evaluates on."""
    user_emb: jax.Array
    item_emb: jax.Array


def config_checks(cfg, n_users: int, n_items: int) -> list:
    del n_users
    m = cfg.model
    return [
        (cfg.eval.get('embeddings', 'last_batch') in EVAL_EMBEDDINGS, 'eval.embeddings',
         f'one of {EVAL_EMBEDDINGS}'),
        (m.embedding_size >= 1, 'model.embedding_size', '>= 1'),
        (1 <= m.knn_k <= n_items, 'model.knn_k', f'in [1, n_items={n_items}]'),
        (0.0 <= m.mm_image_weight <= 1.0, 'model.mm_image_weight', 'in [0, 1]'),
        (m.n_ui_layers >= 0, 'model.n_ui_layers', '>= 0'),
        (m.n_mm_layers >= 0, 'model.n_mm_layers', '>= 0'),
        (m.gamma >= 0.0, 'model.gamma', '>= 0'),
        (m.alpha > 0.0, 'model.alpha', '> 0 (the Beta(alpha, alpha) concentration)'),
        (-1.0 <= m.min_sim <= 1.0, 'model.min_sim', 'in [-1, 1] (a cosine)'),
        (m.min_sim <= m.max_sim <= 1.0, 'model.max_sim', f'in [min_sim={m.min_sim}, 1]'),
    ] + matmul_dtype_checks(m)


def static_key(model_cfg) -> str:
    # The kNN graph holds both modalities' entries for weights strictly between 0 and 1; a
    # weight of 0 or 1 drops one modality's entries (other shapes).
    w = float(model_cfg.mm_image_weight)
    return 'text' if w == 0.0 else 'image' if w == 1.0 else 'both'


def prepare(dataset) -> Prepared:
    if dataset.image_feat is None or dataset.text_feat is None:
        missing = 'data.image_file' if dataset.image_feat is None else 'data.text_file'
        raise ValueError(f'CM3 needs both image and text features of dataset {dataset.name!r}; '
                         f'the file of config field {missing} is absent (its third view mixes '
                         'the projected text and image vectors)')
    train = dataset.train
    return Prepared(np.asarray(dataset.image_feat, np.float32),
                    np.asarray(dataset.text_feat, np.float32),
                    graph.norm_adjacency(train.users, train.items, dataset.n_users,
                                         dataset.n_items),
                    dataset.n_users, dataset.n_items)


def item_graph(prepared: Prepared, knn_k: int, mm_image_weight: float):
    """The frozen kNN item graph: the same construction as LIRDRec's and FREEDOM's (top-k cosine
    per modality, self included, binary, 1/sqrt(r_i r_j) with row sums, mixed w*image +
    (1-w)*text), which is what the reference's CM3 builds (quirk CR6)."""
    return graph.modality_knn_graph(prepared.image, prepared.text, knn_k, mm_image_weight)


def frozen_inputs(prepared: Prepared, dataset, model_cfg) -> Frozen:
    """The features in the point's `model.matmul_dtype` (float32 as prepared, or a bfloat16
    copy), the adjacency and the point's kNN item graph (built from the float32 features)."""
    del dataset
    dtype = matmul_input_dtype(str(model_cfg.get('matmul_dtype', 'float32')))
    cast = lambda x: x if x.dtype == dtype else np.asarray(x, dtype)
    return Frozen(cast(prepared.image), cast(prepared.text), prepared.user_item,
                  item_graph(prepared, int(model_cfg.knn_k), float(model_cfg.mm_image_weight)))


def place_frozen(frozen: Frozen, partitioner, options) -> Frozen:
    """Features split by item over the devices, graphs in the run's sparse representation,
    replicated."""
    graphs = [graph.spmm_operand(g, options.spmm_impl, options.spmm_chunk_size)
              for g in (frozen.user_item, frozen.item_item)]
    return Frozen(partitioner.split_items(frozen.image, 0),
                  partitioner.split_items(frozen.text, 0), *partitioner.replicate(graphs))


def create(model_cfg, n_users: int, n_items: int, layout=None) -> CM3:
    return CM3(n_users=int(n_users), n_items=int(n_items), dim=int(model_cfg.embedding_size),
               n_ui_layers=int(model_cfg.n_ui_layers), n_mm_layers=int(model_cfg.n_mm_layers),
               matmul_dtype=str(model_cfg.get('matmul_dtype', 'float32')), layout=layout)


def forward(net: CM3, params, frozen: Frozen, mix_weights: jax.Array) -> tuple:
    """(users (U, 3*dim), items (I, 3*dim), mix (I, dim)), unnormalised, for given lambdas."""
    return net.apply({'params': params}, frozen.image, frozen.text,
                     Graphs(frozen.user_item, frozen.item_item), mix_weights)


@functools.partial(jax.jit, static_argnums=1)
def _init_params(key, net: CM3, frozen: Frozen) -> dict:
    # Compiled once: Flax's eager init would compile each of its small operations separately.
    return net.init(key, frozen.image, frozen.text, Graphs(frozen.user_item, frozen.item_item),
                    jnp.full((net.n_items,), 0.5, jnp.float32))['params']


def init(key, net: CM3, frozen: Frozen, host_frozen: Frozen) -> tuple:
    del host_frozen
    params = _init_params(key, net, frozen)
    width = 3 * net.dim
    return params, Carry(jnp.zeros((net.n_users, width), jnp.float32),
                         jnp.zeros((net.n_items, width), jnp.float32))


def host_init(model_cfg) -> dict:
    del model_cfg
    return {}


def epoch_schedule(model_cfg, host: dict, epoch: int) -> tuple:
    """Nothing is scheduled; the loss's numeric settings reach the step as scalars (so that a
    vmapped sweep can vary them). Returns (host, scalars)."""
    del epoch
    m = model_cfg
    return host, {'gamma': float(m.gamma), 'min_sim': float(m.min_sim),
                  'max_sim': float(m.max_sim), 'alpha': float(m.alpha)}


def loss_with_mix_weights(net: CM3, params, batch, frozen: Frozen, scalars: dict,
                          mix_weights: jax.Array) -> tuple:
    """(loss, Carry) of one batch for given lambdas (n_items,). `batch`: users, positives,
    negatives (B,) int32, weights (B,) float32 (0 on padding rows)."""
    users, items, mix = forward(net, params, frozen, mix_weights)
    u, i = l2_normalize(users), l2_normalize(items)
    value = cm3_loss(u[batch.users], i[batch.positives], i[batch.negatives],
                     mix[batch.negatives], batch.weights, scalars['gamma'], scalars['min_sim'],
                     scalars['max_sim'])
    return value, Carry(users, items)


def loss(net: CM3, params, carry: Carry, batch, frozen: Frozen, epoch_in, scalars: dict,
         rng) -> tuple:
    """The CM3 loss of one batch with fresh lambdas drawn from `rng` (one per item, as the
    reference draws a new Beta sample every forward pass); returns the carry for evaluation."""
    del carry, epoch_in
    mix_weights = draw_mix_weights(rng, scalars['alpha'], net.n_items)
    return loss_with_mix_weights(net, params, batch, frozen, scalars, mix_weights)


def eval_embeddings(net: CM3, params, carry: Carry, frozen: Frozen, epoch_in, scalars: dict,
                    mode: str) -> tuple:
    """The last training forward's unnormalised embeddings (the reference), or with 'fresh' a
    new forward pass at lambda = 1/2."""
    del epoch_in, scalars
    if mode == 'last_batch':
        return carry.user_emb, carry.item_emb
    users, items, _ = forward(net, params, frozen, jnp.full((net.n_items,), 0.5, jnp.float32))
    return users, items


def flops_per_batch(model_cfg, size: base.ProblemSize) -> float:
    """An analytic count of the FLOPs of one training step (forward and backward).

    Counts: the two towers and the two projections over all items (forward and weight gradient;
    the features are constants, no input gradient), the propagation over the user-item graph
    (2 entries per training row) and the kNN graph (forward and transposed product), and the
    three Gram matrices of the loss (batch users and negatives at 3*dim, the negatives' mixes
    at dim): forward and the two products of the backward pass. Elementwise work (slerp,
    exponentials over the B x B pairs, Adam) is left out.
    """
    d = int(model_cfg.embedding_size)
    width = 3 * d
    per_item = sum(2 * (f * 4 * d + 4 * d * d + f * d) for f in size.feature_dims[:2])
    towers = 2 * size.n_items * per_item
    entries = (int(model_cfg.n_ui_layers) * 2 * size.n_train
               + int(model_cfg.n_mm_layers) * size.n_items * int(model_cfg.knn_k))
    propagation = 2 * 2 * width * entries
    grams = 3 * 2 * size.batch_size ** 2 * (2 * width + d)
    return float(towers + propagation + grams)


MODEL = base.Model(
    name='cm3', batch_kind='bpr',
    sweep_fields=('model.gamma', 'model.min_sim', 'model.max_sim', 'model.alpha',
                  'model.mm_image_weight'),
    config_checks=config_checks, static_key=static_key, prepare=prepare,
    frozen_inputs=frozen_inputs, place_frozen=place_frozen, create=create, init=init,
    host_init=host_init, epoch_schedule=epoch_schedule, epoch_inputs=base.no_epoch_inputs,
    start_epoch=base.keep_state, loss=loss, eval_embeddings=eval_embeddings,
    flops_per_batch=flops_per_batch,
    parity=base.ParityHooks(module='lirdrec_jax.parity.cm3', reference_repo='enoche/CM3'))
