"""LIRDRec (arXiv 2505.04960) as a pure Flax module.

The forward pass returns everything the next step needs (user and item representations and
the fusion attention) instead of stashing it on the module, as the reference does with
`result_embed` and `last_att`; the training loop folds that state in (see train.py).
"""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from flax import linen as nn

from lirdrec_jax import graph
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
    given, or copies in bfloat16 (`matmul_dtype`) and/or with transposed copies when
    `transposed` (always with bfloat16, whose weight gradients need them to be fast).
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f'config field model.matmul_dtype = {matmul_dtype!r}; expected one of '
                         f'{MATMUL_DTYPES}')
    if not (transposed or matmul_dtype == 'bfloat16'):
        return ItemFeatures(*features[:3])  # as given: no copy
    dtype = jnp.bfloat16 if matmul_dtype == 'bfloat16' else jnp.float32
    base = [jnp.asarray(x, dtype) for x in features[:3]]
    return ItemFeatures(*base, *(_transposed(x) for x in base))


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
