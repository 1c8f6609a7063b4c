"""Synthetic recommender data: the embedded default dataset and the benchmark's datasets.

One generative model, two ways of sizing it:
  * `generate_synthetic`: the embedded default dataset (and smaller or larger ones like it for
    tests and docs). Users draw a random number of items; the result is 5-core filtered and
    re-indexed, so the final counts are close to, not exactly, the requested sizes.
  * `generate_exact_counts`: exactly n_users users, n_items items and n_interactions rows (the
    benchmark, at the scale of MMRec's Amazon datasets), no filtering.

The model: users and items live in a shared latent space (items grouped into categories). Each
user picks distinct items with probability proportional to exp(score / temperature) times a
popularity weight, so the interactions carry collaborative signal; the item features are noisy
projections of the item factors, so they carry content signal about the same choices. Rows get
random times within each user's active window and are split per user in time order (about
80/10/10, `mmrec_files.temporal_split`), like MMRec's Amazon datasets. `generate_synthetic` also
gives every item a short text (`item_texts`): made-up topic words drawn from the item's factors
plus generic filler words, the input of DGVAE's word view (`lirdrec_jax.word_view`).

Output: `SyntheticData` (arrays), written in MMRec layout by `write_mmrec_files` or turned into
the in-memory `MMRecDataset` that training reads by `to_dataset`.

Usage:
  python -m data_prep.synthetic --out_dir /tmp/data            # writes /tmp/data/synthetic/
  python -m lirdrec_jax.main ... --config.data.data_dir=/tmp/data --config.data.dataset=synthetic

Bit-identical output on every machine: the random draws come from `np.random.default_rng(seed)`
(a platform-independent bit generator), and every floating-point value that is written is
computed with elementwise IEEE operations in a fixed order (no BLAS matmul, whose summation
order differs between CPUs and libraries), then saved as float32 with `np.save`. Large arrays
are built in row blocks; since each row is computed independently and the random draws fill
arrays element by element in order, the blocking does not change a single bit.
"""
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional, Tuple, Union

import numpy as np

from lirdrec_jax import mmrec_files, model_inputs, word_view
from lirdrec_jax.data import DataError, Interactions, MMRecDataset
from lirdrec_jax.mmrec_files import format_inter as _format_inter_columns
from lirdrec_jax.mmrec_files import k_core, temporal_split, warn

PathLike = Union[str, os.PathLike]

DEFAULT_NAME = 'synthetic'
# Bump the suffix whenever the generator or its defaults change: the default dataset is cached
# on disk under this name and would otherwise be silently reused in its old form.
DEFAULT_VERSION = 'synthetic-v1'
CACHE_ENV = 'LIRDREC_JAX_CACHE'
# Timestamps are seconds in [T0, T0 + SPAN): 2014-01-01 onwards, over four years.
T0 = 1_388_534_400
SPAN = 4 * 365 * 86_400
# Rows per block when sampling interactions (bounds the (block, n_items) score matrices), and
# at most SAMPLE_BLOCK_ELEMENTS float64 entries per block (4 MB): blocks that small are reused
# by the allocator, where larger ones are fresh pages every time, whose first touch costs more
# than the arithmetic at 10^4-10^5 items. Neither changes a bit of the output (see above).
USER_BLOCK = 512
SAMPLE_BLOCK_ELEMENTS = 1 << 19
# Float64 elements per block when building the features (16 MB).
FEATURE_BLOCK_ELEMENTS = 1 << 21
# The item texts draw from their own stream, np.random.default_rng([seed, TEXT_STREAM]), so
# adding them changed no byte of the files generated before them.
TEXT_STREAM = 0x74657874  # 'text'
# Item texts: TOPIC_WORDS made-up words, each with a direction in the latent space; an item
# draws WORDS_PER_ITEM of them (with replacement, P ∝ exp(cos(item, word) / WORD_TEMPERATURE))
# and FILLER_PER_ITEM generic FILLER_WORDS (uniformly). On the default dataset, ranking items
# by the TF-IDF cosine of their text with a user's word view gives about 1.7x the test
# Recall@20 of most-popular (0.251 vs 0.149; the text features' cosine: 1.9x); the filler
# words are in most user documents and fall to max_df.
TOPIC_WORDS = 400
WORDS_PER_ITEM = 12
FILLER_PER_ITEM = 6
WORD_TEMPERATURE = 0.1
FILLER_WORDS = ('the', 'and', 'with', 'for', 'new', 'great', 'quality', 'easy', 'use', 'set',
                'size', 'color', 'pack', 'product', 'design', 'soft', 'classic', 'perfect',
                'best', 'value')
_SYLLABLES = tuple(c + v for c in 'bdgklmnprstvz' for v in 'aeiou')


class SyntheticData(NamedTuple):
    """A generated dataset, rows sorted by (user, timestamp).

    Attributes:
      users: (n,) int64 user ids, contiguous 0..n_users-1.
      items: (n,) int64 item ids in 0..n_items-1 (contiguous for `generate_synthetic`; in
        `generate_exact_counts` a few rare items may have no row).
      ratings: (n,) int64 ratings in 1..5 (written for realism; MMRec ignores them).
      timestamps: (n,) int64 seconds, distinct within a user.
      x_label: (n,) int64 0/1/2 = train/valid/test.
      image_feat: (n_items, image_dim) float32, non-negative.
      text_feat: (n_items, text_dim) float32, rows of unit L2 norm.
      item_text: (n_items,) the text of each item (`item_texts`), or None
        (`generate_exact_counts` makes them only when asked).
    """
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    x_label: np.ndarray
    image_feat: np.ndarray
    text_feat: np.ndarray
    item_text: Optional[Tuple[str, ...]] = None


# --------------------------------------------------------------------------- building blocks


def project(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w in float64, summed over the inner dimension in a fixed order.

    Args:
      x: (n, k) float64.
      w: (k, d) float64.

    Returns:
      (n, d) float64, bit-identical on every machine (unlike BLAS, whose blocking and FMA use
      depend on the CPU). k is the small latent size, so the loop is cheap.
    """
    out = np.zeros((x.shape[0], w.shape[1]), dtype=np.float64)
    term = np.empty_like(out)
    for k in range(x.shape[1]):
        np.multiply(x[:, k:k + 1], w[k:k + 1, :], out=term)
        out += term
    return out


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """(n, d) rows divided by their L2 norm, the squares summed column by column (fixed order)."""
    sq = np.zeros(x.shape[0], dtype=np.float64)
    for j in range(x.shape[1]):
        sq += x[:, j] * x[:, j]
    return x / np.sqrt(sq)[:, None]


def _row_blocks(n_rows: int, block: int) -> Iterator[slice]:
    for start in range(0, n_rows, block):
        yield slice(start, min(start + block, n_rows))


def latent_factors(rng: np.random.Generator, n_users: int, n_items: int, latent_dim: int,
                   n_categories: int, category_spread: float
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """User and item factors in a space where items form categories.

    Returns:
      (user_factors (n_users, latent_dim), item_factors (n_items, latent_dim)), float64, each
      row of norm about 1, so that a dot product is about a cosine.
    """
    centers = rng.standard_normal((n_categories, latent_dim))
    item_cat = rng.integers(0, n_categories, size=n_items)
    items = centers[item_cat] + category_spread * rng.standard_normal((n_items, latent_dim))
    # A user likes one main category and a bit of a second one, plus personal taste.
    main = rng.integers(0, n_categories, size=n_users)
    second = rng.integers(0, n_categories, size=n_users)
    users = (centers[main] + 0.5 * centers[second]
             + category_spread * rng.standard_normal((n_users, latent_dim)))
    scale = 1.0 / np.sqrt(latent_dim * (1.0 + category_spread ** 2))
    return users * scale, items * scale


def zipf_log_popularity(rng: np.random.Generator, n_items: int, offset: float = 10.0
                        ) -> np.ndarray:
    """(n_items,) log popularity weights, P(item of rank r) ∝ 1 / (r + offset), ranks shuffled
    over the item ids: a long tail as in real logs."""
    popularity = 1.0 / (np.arange(n_items) + offset)
    return np.log(rng.permutation(popularity / popularity.sum()))


def _top_k_descending(keys: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column indices of each row's k largest keys, largest first.

    The same as `np.argsort(-keys, axis=1, kind='stable')[:, :k]` (ties by column index) without
    sorting whole rows; the keys are continuous (Gumbel-perturbed), so a tie at the k-th place,
    where the two could differ, does not occur in practice.
    """
    n = keys.shape[1]
    if k < n:
        part = np.argpartition(keys, n - k, axis=1)[:, n - k:]
    else:
        part = np.broadcast_to(np.arange(n), keys.shape)
    within = np.lexsort((part, -np.take_along_axis(keys, part, axis=1)), axis=-1)
    return np.take_along_axis(part, within, axis=1)


def project_windows(x: np.ndarray, ring: np.ndarray, starts: np.ndarray, width: int
                    ) -> np.ndarray:
    """`project(x, w)` at each row's own window of `width` consecutive columns, in the same
    fixed summation order.

    Args:
      x: (b, k) float64.
      ring: (k, m + width - 1) float64: the m columns of w followed by its first width - 1
        again, so that a window may wrap around.
      starts: (b,) first column of each row's window, in [0, m).

    Returns:
      (b, width) float64, out[r, j] = sum_k x[r, k] * ring[k, starts[r] + j], k ascending.
    """
    out = np.zeros((x.shape[0], width), dtype=np.float64)
    for k in range(x.shape[1]):
        out += x[:, k:k + 1] * np.lib.stride_tricks.sliding_window_view(ring[k], width)[starts]
    return out


def _ring(a: np.ndarray, order: np.ndarray, width: int) -> np.ndarray:
    """a's last axis permuted by `order` and continued by its first width - 1 entries again."""
    return np.concatenate([a[..., order], a[..., order[:width - 1]]], axis=-1)


def sample_interactions(rng: np.random.Generator, user_f: np.ndarray, item_f: np.ndarray,
                        popularity: np.ndarray, lengths: np.ndarray, temperature: float,
                        candidates: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user draws `lengths[u]` distinct items, P(item) ∝ exp(score/temperature + popularity).

    Sampling without replacement uses the Gumbel-top-k trick: the k largest of
    log-weight + Gumbel noise are a draw of k items without replacement. Users are processed
    in row blocks (`USER_BLOCK`, `SAMPLE_BLOCK_ELEMENTS`), so that memory stays
    O(block x n_items) at any scale.

    That is one Gumbel draw per (user, item) pair: 1.2e10 at Amazon-Electronics scale, tens of
    minutes. With `candidates` = c (0 < c < n_items), each user draws from c candidate items
    instead, a window of c consecutive items of one random permutation of the items starting
    at a random place per user (distinct items, each item a candidate of about c / n_items of
    the users), with the same weights: n_users x c draws. 0 = every item is a candidate.

    Args:
      user_f: (n_users, k) user factors.
      item_f: (n_items, k) item factors.
      popularity: (n_items,) log popularity weight of each item.
      lengths: (n_users,) number of items per user, each in [1, n_items] (in [1, c] with
        candidates).
      temperature: softmax temperature of the preference score.
      candidates: c, or 0 (every item; the permutation and starts are drawn only when c > 0,
        so the default consumes the random stream exactly as before the option existed).

    Returns:
      (users, items, scores) of the drawn interactions, (n,) each, users ascending and each
      user's items in drawing order; scores are the preference scores, used for the ratings.
    """
    n_items = item_f.shape[0]
    windowed = 0 < candidates < n_items
    item_t = np.ascontiguousarray(item_f.T)
    if windowed:
        order = rng.permutation(n_items)
        start = rng.integers(0, n_items, size=user_f.shape[0])
        rings = (_ring(item_t, order, candidates), _ring(popularity, order, candidates),
                 _ring(np.arange(n_items), order, candidates))
        windows = lambda a, rows: np.lib.stride_tricks.sliding_window_view(
            a, candidates)[start[rows]]
    n_cols = candidates if windowed else n_items
    block = max(1, min(USER_BLOCK, SAMPLE_BLOCK_ELEMENTS // n_cols))
    users, items, scores = [], [], []
    for rows in _row_blocks(user_f.shape[0], block):
        if windowed:
            # The window of item ids order[start], order[start + 1], ... (mod n_items).
            cols = windows(rings[2], rows)                              # (block, c)
            score = project_windows(user_f[rows], rings[0], start[rows], candidates)
            keys = score / temperature
            keys += windows(rings[1], rows)
        else:
            score = project(user_f[rows], item_t)                   # (block, n_items)
            keys = score / temperature                              # in place from here on
            keys += popularity[None, :]
        keys += rng.gumbel(size=keys.shape)
        block_lengths = lengths[rows]
        top = _top_k_descending(keys, int(block_lengths.max()))
        take = np.arange(top.shape[1])[None, :] < block_lengths[:, None]
        local = np.broadcast_to(np.arange(top.shape[0])[:, None], top.shape)[take]
        chosen = top[take]
        users.append(local + rows.start)
        items.append(cols[local, chosen] if windowed else chosen)
        scores.append(score[local, chosen])
    return (np.concatenate(users).astype(np.int64), np.concatenate(items).astype(np.int64),
            np.concatenate(scores))


def random_timestamps(rng: np.random.Generator, users: np.ndarray, n_users: int) -> np.ndarray:
    """(n,) int64 seconds: each user is active over a random window; each row gets a random
    second in it, independent of the preference order (otherwise the test split would hold the
    least liked items)."""
    start = rng.integers(T0, T0 + SPAN // 2, size=n_users)
    duration = rng.integers(30 * 86_400, SPAN // 2, size=n_users)
    offsets = rng.random(users.shape[0])
    return start[users] + np.floor(offsets * duration[users]).astype(np.int64)


def ratings_from_scores(rng: np.random.Generator, score: np.ndarray) -> np.ndarray:
    """(n,) int64 ratings 1..5: mostly 4-5 stars, higher for better-liked items, as in Amazon
    reviews."""
    z = (score - score.mean()) / score.std()
    return np.clip(np.floor(4.6 + 0.6 * z + 0.6 * rng.standard_normal(score.shape[0])),
                   1, 5).astype(np.int64)


def item_features(rng: np.random.Generator, item_f: np.ndarray, image_dim: int, text_dim: int,
                  image_noise: float, text_noise: float) -> Tuple[np.ndarray, np.ndarray]:
    """Noisy random projections of the item factors.

    Returns:
      image_feat: (n_items, image_dim) float32, ReLU of a projection plus noise (non-negative
        and sparse-ish, like CNN penultimate-layer activations), never an all-zero row.
      text_feat: (n_items, text_dim) float32, projection plus noise, L2-normalised rows (like
        sentence embeddings).
    """
    n_items, latent_dim = item_f.shape
    # Normalised factors: the feature signal-to-noise ratio then does not depend on the norm.
    unit = l2_normalize_rows(item_f)
    p_img = rng.standard_normal((latent_dim, image_dim))
    p_txt = rng.standard_normal((latent_dim, text_dim))
    image = np.empty((n_items, image_dim), dtype=np.float32)
    for rows in _row_blocks(n_items, max(1, FEATURE_BLOCK_ELEMENTS // image_dim)):
        img = project(unit[rows], p_img) + image_noise * rng.standard_normal(
            (rows.stop - rows.start, image_dim))
        # The small positive bias leaves a little over half of the units active, as after a
        # ReLU.
        img = np.maximum(img + 0.25, 0.0)
        img[:, 0] = np.maximum(img[:, 0], 1e-3)  # no all-zero row (cosine needs a norm)
        image[rows] = img.astype(np.float32)
    text = np.empty((n_items, text_dim), dtype=np.float32)
    for rows in _row_blocks(n_items, max(1, FEATURE_BLOCK_ELEMENTS // text_dim)):
        txt = project(unit[rows], p_txt) + text_noise * rng.standard_normal(
            (rows.stop - rows.start, text_dim))
        text[rows] = l2_normalize_rows(txt).astype(np.float32)
    return image, text


def topic_words(n: int) -> Tuple[str, ...]:
    """`n` distinct made-up lower-case words of three consonant-vowel syllables ('bakedo')."""
    if n > len(_SYLLABLES) ** 2:
        raise ValueError(f'at most {len(_SYLLABLES) ** 2} topic words, got {n}')
    s = len(_SYLLABLES)
    # The first two syllables already differ between any two k < s * s.
    return tuple(_SYLLABLES[k % s] + _SYLLABLES[(k // s + 17 * k + 7) % s]
                 + _SYLLABLES[(29 * k + 3) % s] for k in range(n))


def item_texts(seed: int, item_f: np.ndarray, n_words: int = TOPIC_WORDS,
               words_per_item: int = WORDS_PER_ITEM, filler_per_item: int = FILLER_PER_ITEM,
               temperature: float = WORD_TEMPERATURE) -> Tuple[str, ...]:
    """A short text per item whose words carry signal about the item's factors.

    Each topic word has a random unit direction in the latent space; an item draws
    `words_per_item` topic words with replacement, P(word) ∝ exp(cos(item, word) /
    temperature) (Gumbel-max), then `filler_per_item` words of FILLER_WORDS uniformly, so
    items close in the latent space (one category) draw from the same words. The draws come from
    np.random.default_rng([seed, TEXT_STREAM]), separate from the generator's stream, in item
    blocks of a fixed size; the dot products use `project` (fixed order), so the texts are the
    same on every machine.

    Args:
      seed: the dataset's seed.
      item_f: (n_items, latent_dim) item factors.

    Returns:
      (n_items,) texts, words separated by single spaces.
    """
    rng = np.random.default_rng([seed, TEXT_STREAM])
    vocab = topic_words(n_words)
    directions = l2_normalize_rows(rng.standard_normal((n_words, item_f.shape[1])))
    logits = project(l2_normalize_rows(item_f), np.ascontiguousarray(directions.T))
    logits /= temperature
    texts = []
    block = max(1, FEATURE_BLOCK_ELEMENTS // (words_per_item * n_words))
    for rows in _row_blocks(item_f.shape[0], block):
        keys = logits[rows, None, :] + rng.gumbel(size=(rows.stop - rows.start, words_per_item,
                                                        n_words))
        picks = np.argmax(keys, axis=2)
        filler = rng.integers(0, len(FILLER_WORDS), size=(rows.stop - rows.start,
                                                          filler_per_item))
        texts += [' '.join([vocab[j] for j in p] + [FILLER_WORDS[j] for j in f])
                  for p, f in zip(picks.tolist(), filler.tolist())]
    return tuple(texts)


def _reindex(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(kept original ids ascending, contiguous new id of each row)."""
    kept, new = np.unique(ids, return_inverse=True)
    return kept, new.astype(np.int64)


def _sort_and_split(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                    ratings: np.ndarray, valid_ratio: float, test_ratio: float
                    ) -> Tuple[np.ndarray, ...]:
    """Rows sorted by (user, time, item) and their x_label; (users, items, timestamps, ratings,
    labels)."""
    order = np.lexsort((items, timestamps, users))  # by user, then time (item breaks ties)
    users, items, timestamps, ratings = (a[order] for a in (users, items, timestamps, ratings))
    labels = temporal_split(users, timestamps, valid_ratio, test_ratio)
    if np.unique(users[labels == 0]).size != users.max() + 1:
        raise ValueError(f'valid_ratio={valid_ratio} + test_ratio={test_ratio} leave some users '
                         f'without a train row; expected most of each user\'s rows in train')
    return users, items, timestamps, ratings, labels


# --------------------------------------------------------------------------- generators


def generate_synthetic(*, n_users: int = 1500, n_items: int = 800, seed: int = 0,
                       image_dim: int = 512, text_dim: int = 384, latent_dim: int = 16,
                       n_categories: int = 24, category_spread: float = 0.8,
                       temperature: float = 0.15, popularity_weight: float = 1.0,
                       mean_length: float = 18.0, min_length: int = 6,
                       image_noise: float = 3.0, text_noise: float = 2.5,
                       valid_ratio: float = 0.1, test_ratio: float = 0.1,
                       core: int = 5) -> SyntheticData:
    """The embedded default dataset's generator (its defaults give the default dataset).

    Args:
      n_users, n_items: sizes before the k-core filter (a few items usually drop out).
      seed: seed of `np.random.default_rng`; the output is a pure function of all arguments.
      image_dim, text_dim: feature widths.
      latent_dim: size of the user/item factors.
      n_categories, category_spread: items cluster around `n_categories` centres with this
        relative within-category spread.
      temperature: softmax temperature of the preference score (lower = more personal).
      popularity_weight: std of the per-item log-popularity term (higher = more skew).
      mean_length, min_length: interactions per user are `min_length` + a geometric-like
        (negative binomial) draw with mean `mean_length - min_length`, before filtering.
      image_noise, text_noise: std of the feature noise relative to the signal. The defaults
        were tuned so that, on the default dataset, ranking by text-feature similarity to a
        user's train items beats most-popular by about 1.9x in test Recall@20 (image: ~1.25x),
        while item-kNN collaborative filtering does better still: both signals are useful
        and neither is perfect.
      valid_ratio, test_ratio: per-user temporal split fractions.
      core: k of the iterated k-core filter.

    Returns:
      The dataset, rows sorted by (user, timestamp), ids contiguous.
    """
    # core >= 3 leaves every user at least one train row next to one valid and one test row.
    if not 3 <= core <= min_length < mean_length:
        raise ValueError(f'need 3 <= core <= min_length < mean_length, got core={core}, '
                         f'min_length={min_length}, mean_length={mean_length}')
    rng = np.random.default_rng(seed)
    user_f, item_f = latent_factors(rng, n_users, n_items, latent_dim, n_categories,
                                    category_spread)
    popularity = popularity_weight * rng.standard_normal(n_items)
    extra = mean_length - min_length
    # Negative binomial with shape 2: a long tail of heavy users, as in real logs.
    lengths = min_length + rng.negative_binomial(2, 2.0 / (2.0 + extra), size=n_users)
    lengths = np.minimum(lengths, n_items // 4)
    users, items, score = sample_interactions(rng, user_f, item_f, popularity, lengths,
                                              temperature)
    timestamps = random_timestamps(rng, users, n_users)
    ratings = ratings_from_scores(rng, score)

    keep = k_core(users, items, core)
    if not keep.any():
        raise ValueError(f'no interactions survive the {core}-core filter with n_users={n_users}, '
                         f'n_items={n_items}; expected larger sizes')
    users, items, timestamps, ratings = (a[keep] for a in (users, items, timestamps, ratings))
    _, users = _reindex(users)
    kept_items, items = _reindex(items)
    users, items, timestamps, ratings, labels = _sort_and_split(
        users, items, timestamps, ratings, valid_ratio, test_ratio)

    image, text = item_features(rng, item_f, image_dim, text_dim, image_noise, text_noise)
    texts = item_texts(seed, item_f)
    return SyntheticData(users, items, ratings, timestamps, labels, image[kept_items],
                         text[kept_items], tuple(texts[k] for k in kept_items))


def exact_lengths(rng: np.random.Generator, n_users: int, n_interactions: int,
                  min_length: int, max_length: int) -> np.ndarray:
    """(n_users,) interactions per user, each in [min_length, max_length], summing exactly to
    `n_interactions`: `min_length` each, the rest spread by a Pareto (long-tailed) activity."""
    if not min_length * n_users <= n_interactions <= max_length * n_users:
        raise ValueError(f'{n_interactions} interactions cannot give {n_users} users between '
                         f'{min_length} and {max_length} each')
    activity = rng.pareto(2.0, n_users) + 1.0
    extra = rng.multinomial(n_interactions - min_length * n_users, activity / activity.sum())
    lengths = np.minimum(min_length + extra, max_length)
    # Rows cut off by the cap go to the most active users that still have room.
    short = n_interactions - int(lengths.sum())
    if short:
        order = np.argsort(-activity, kind='stable')
        room = max_length - lengths[order]
        lengths[order] += np.clip(short - (np.cumsum(room) - room), 0, room)
    return lengths


def generate_exact_counts(n_users: int, n_items: int, n_interactions: int, *, seed: int = 0,
                          image_dim: int = 4096, text_dim: int = 384, latent_dim: int = 16,
                          n_categories: int = 24, category_spread: float = 0.8,
                          temperature: float = 0.15, popularity_offset: float = 10.0,
                          min_length: int = 5, image_noise: float = 3.0,
                          text_noise: float = 2.5, valid_ratio: float = 0.1,
                          test_ratio: float = 0.1, item_text: bool = False,
                          candidate_items: int = 0) -> SyntheticData:
    """A dataset with exactly the given counts (the benchmark's data, e.g. at MMRec scale).

    Same model as `generate_synthetic`, sized differently and not filtered: every user draws at
    least `min_length` (>= 3) distinct items, the rest of the rows go to users with a
    long-tailed (Pareto) activity, at most n_items // 2 per user; item popularity is Zipf-like,
    P ∝ 1 / (rank + popularity_offset). Each user's latest rows are test and valid
    (max(1, round(n * ratio)) each, as MMRec's chronological 8:1:1 split gives it for short
    histories: about 74/13/13 at Baby scale). Rare items may end up with no row.

    Args:
      n_users, n_items, n_interactions: the exact counts.
      seed: seed of `np.random.default_rng`; the output is a pure function of all arguments.
      item_text: also make the item texts (`item_texts`, from their own stream: the other
        arrays are the same either way), e.g. for an in-memory word view
        (`word_view.build_word_view`); off by default (seconds at MMRec scale).
      candidate_items: 0 (default): every user draws from all items; c > 0: from c candidate
        items each (`sample_interactions`), and at most c // 2 items per user: for 10^10
        user-item pairs, where drawing over all of them takes tens of minutes. 0 and any
        c >= n_items give the same output.
      Others: as in `generate_synthetic`.

    Returns:
      The dataset, rows sorted by (user, timestamp); `to_dataset` makes the in-memory
      dataset with n_users and n_items exactly as given.
    """
    if min_length < 3:
        raise ValueError(f'min_length={min_length}: expected >= 3 (one train, one valid and one '
                         f'test row per user)')
    candidates = candidate_items if 0 < candidate_items < n_items else 0
    if candidates and candidates < 2 * min_length:
        raise ValueError(f'candidate_items={candidate_items}: expected 0 or at least '
                         f'2 * min_length = {2 * min_length}')
    rng = np.random.default_rng(seed)
    user_f, item_f = latent_factors(rng, n_users, n_items, latent_dim, n_categories,
                                    category_spread)
    popularity = zipf_log_popularity(rng, n_items, popularity_offset)
    lengths = exact_lengths(rng, n_users, n_interactions, min_length,
                            max(min_length, (candidates or n_items) // 2))
    users, items, score = sample_interactions(rng, user_f, item_f, popularity, lengths,
                                              temperature, candidates)
    timestamps = random_timestamps(rng, users, n_users)
    ratings = ratings_from_scores(rng, score)
    users, items, timestamps, ratings, labels = _sort_and_split(
        users, items, timestamps, ratings, valid_ratio, test_ratio)
    image, text = item_features(rng, item_f, image_dim, text_dim, image_noise, text_noise)
    texts = item_texts(seed, item_f) if item_text else None
    return SyntheticData(users, items, ratings, timestamps, labels, image, text, texts)


# --------------------------------------------------------------------------- output


def format_inter(data: SyntheticData) -> str:
    """The `.inter` text: tab-separated, header line first, one row per interaction."""
    return _format_inter_columns(data.users, data.items, data.ratings, data.timestamps,
                                 data.x_label)


def to_dataset(data: SyntheticData, name: str) -> MMRecDataset:
    """The in-memory dataset training reads, without files: n_users = max user id + 1,
    n_items = the feature rows, each split in row order (as `load_mmrec` of the written files
    gives it when every item has a row)."""
    def split(label):
        rows = data.x_label == label
        return Interactions(data.users[rows].astype(np.int32), data.items[rows].astype(np.int32))

    return MMRecDataset(name, int(data.users.max()) + 1, int(data.image_feat.shape[0]),
                        split(0), split(1), split(2), data.image_feat, data.text_feat)


def format_item_texts(texts) -> str:
    """`item_text.jsonl` of a generated dataset: one JSON line {"itemID": i, "text": ...} per
    item, itemID order (the folder has no raw ids)."""
    return ''.join(json.dumps({'itemID': i, 'text': t}, ensure_ascii=False) + '\n'
                   for i, t in enumerate(texts))


def add_word_files(folder: PathLike, data: SyntheticData, only_missing: bool = True
                   ) -> Dict[str, str]:
    """Writes the item texts of `data` (`item_text.jsonl`) and the word view built from them
    (`word_view.WORDS_FILE`, `word_view.VOCAB_FILE`: each user's TF-IDF over its TRAINING
    items' words, the reference's min_df/max_df) into a dataset folder, each atomically.

    Returns:
      {file name: 'written', 'kept' (only_missing and present) or 'skipped' (no word passes
      the document-frequency bounds, as on a tiny dataset: warned)}.
    """
    folder = Path(folder)
    names = (word_view.ITEM_TEXT_FILE, word_view.WORDS_FILE, word_view.VOCAB_FILE)
    done = {f: 'kept' for f in names if only_missing and (folder / f).is_file()}
    if word_view.ITEM_TEXT_FILE not in done:
        text = format_item_texts(data.item_text).encode('utf-8')
        word_view.atomic_write(folder / word_view.ITEM_TEXT_FILE, lambda f: f.write(text))
        done[word_view.ITEM_TEXT_FILE] = 'written'
    if len(done) == len(names):
        return done
    train = data.x_label == 0
    docs = [word_view.item_document(t, None) for t in data.item_text]
    try:
        view = word_view.build_word_view(docs, data.users[train], data.items[train],
                                         int(data.users.max()) + 1)
    except ValueError as e:
        warn(f'{folder}: no word view written ({e})')
        return {**done, **{f: 'skipped' for f in names if f not in done}}
    # Written together: the two files of one build always agree.
    word_view.save_word_view(view, folder / word_view.WORDS_FILE,
                             folder / word_view.VOCAB_FILE)
    return {**{f: 'written' for f in names}, **done}


def write_mmrec_files(out_dir: PathLike, name: str, data: SyntheticData) -> Path:
    """Writes `data` as `<out_dir>/<name>/{<name>.inter, image_feat.npy, text_feat.npy}`, plus
    the no-LLM stand-ins of MLLMRec's inputs, `image_text_feat.npy` (the text-feature rows) and
    `user_preferences_feat.npy` (each user's mean of them over its training items), see
    `lirdrec_jax.model_inputs`, and, when `data` has item texts, `item_text.jsonl` and DGVAE's
    word view (`add_word_files`).

    Returns:
      The dataset folder `<out_dir>/<name>`.
    """
    n_items = data.image_feat.shape[0]
    if int(data.items.max()) + 1 != n_items:
        # MMRec counts items as max itemID + 1, which must match the feature rows.
        raise ValueError(f'the last item id with a row is {int(data.items.max())} but there are '
                         f'{n_items} feature rows; MMRec layout needs a row for item '
                         f'{n_items - 1} (use to_dataset for in-memory data)')
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    # newline='\n': the same bytes on Windows as elsewhere.
    with open(folder / f'{name}.inter', 'w', encoding='utf-8', newline='\n') as f:
        f.write(format_inter(data))
    np.save(folder / 'image_feat.npy', data.image_feat)
    np.save(folder / 'text_feat.npy', data.text_feat)
    train = data.x_label == 0
    model_inputs.add_no_llm_files(folder, data.text_feat, data.users[train], data.items[train],
                                  int(data.users.max()) + 1, only_missing=False)
    if data.item_text is not None:
        add_word_files(folder, data, only_missing=False)
    return folder


def write_synthetic_dataset(out_dir: PathLike, name: str = DEFAULT_NAME, *, n_users: int = 1500,
                            n_items: int = 800, seed: int = 0, image_dim: int = 512,
                            text_dim: int = 384, **generator_kwargs) -> Path:
    """Generates a `generate_synthetic` dataset and writes it in MMRec layout.

    Writes `<out_dir>/<name>/<name>.inter` (header userID, itemID, rating, timestamp, x_label),
    `image_feat.npy` and `text_feat.npy` (float32) and the no-LLM model inputs of
    `write_mmrec_files`, overwriting those files if present.

    Args:
      out_dir: the data folder (what `load_mmrec` calls data_dir).
      name: dataset name.
      n_users, n_items, seed, image_dim, text_dim, **generator_kwargs: see
        `generate_synthetic`.

    Returns:
      The dataset folder `<out_dir>/<name>`.
    """
    data = generate_synthetic(n_users=n_users, n_items=n_items, seed=seed, image_dim=image_dim,
                              text_dim=text_dim, **generator_kwargs)
    return write_mmrec_files(out_dir, name, data)


def summarize(data: SyntheticData) -> str:
    """A few lines: sizes, split counts, per-user lengths, feature shapes."""
    n_users = int(data.users.max()) + 1
    n_items = int(data.image_feat.shape[0])
    per_user = np.bincount(data.users)
    per_item = np.bincount(data.items, minlength=n_items)
    split = np.bincount(data.x_label, minlength=3)
    return '\n'.join([
        f'users {n_users}, items {n_items}, interactions {data.users.shape[0]} '
        f'(sparsity {1 - data.users.shape[0] / (n_users * n_items):.4%})',
        f'per user: mean {per_user.mean():.1f}, min {per_user.min()}, max {per_user.max()}; '
        f'per item: mean {per_item.mean():.1f}, min {per_item.min()}, max {per_item.max()}',
        f'split rows: train {split[0]}, valid {split[1]}, test {split[2]}',
        f'image_feat {data.image_feat.shape}, text_feat {data.text_feat.shape}',
    ])


# --------------------------------------------------------------------------- the default


def default_dataset_dir() -> Path:
    """Where the embedded default lives: `$LIRDREC_JAX_CACHE/synthetic-v1`, or
    `~/.cache/lirdrec_jax/synthetic-v1` when the variable is unset or empty."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / '.cache' / 'lirdrec_jax'
    return base / DEFAULT_VERSION


def _is_complete(data_dir: Path, name: str) -> bool:
    folder = data_dir / name
    return all((folder / f).is_file() for f in (f'{name}.inter', 'image_feat.npy',
                                                'text_feat.npy'))


def _add_missing_word_files(folder: Path, name: str) -> None:
    """Adds the item texts and the word view (`add_word_files`) that a default folder written
    before they existed lacks. The texts come from the generator, so the default is generated
    again in memory (well under a second) and used only if its `.inter` file is the folder's,
    byte for byte; otherwise nothing is added (warned)."""
    names = (word_view.ITEM_TEXT_FILE, word_view.WORDS_FILE, word_view.VOCAB_FILE)
    if all((folder / f).is_file() for f in names):
        return
    data = generate_synthetic()
    if mmrec_files.inter_path(folder, name).read_bytes() != format_inter(data).encode():
        warn(f'{folder}: its {name}.inter is not the default generator\'s output, so its item '
             f'texts and word view cannot be added; delete {folder.parent} to regenerate it')
        return
    add_word_files(folder, data, only_missing=True)


def _add_missing_model_inputs(folder: Path, name: str) -> None:
    """Adds the no-LLM model inputs (`model_inputs.NO_LLM_FILES`) that a default folder written
    before they existed lacks, built from its own files, and the word files
    (`_add_missing_word_files`); nothing else is rewritten."""
    _add_missing_word_files(folder, name)
    if not model_inputs.missing_no_llm_files(folder):
        return
    inter = mmrec_files.inter_path(folder, name)
    splits = mmrec_files.split_interactions(mmrec_files.read_inter(inter), inter)
    text = mmrec_files.load_features(folder / 'text_feat.npy', splits.n_items)
    model_inputs.add_no_llm_files(folder, text, splits.arrays['train_users'],
                                  splits.arrays['train_items'], splits.n_users)


def ensure_default_dataset() -> Tuple[Path, str]:
    """Generates the default dataset on first use and returns where to load it from.

    Generation goes into a temporary sibling folder that is then renamed into place, so an
    interrupted run or two concurrent first runs never leave a half-written dataset. A folder
    generated before the no-LLM model inputs or the item texts and word view existed gets them
    added (each written atomically), its other files untouched.

    Returns:
      (data_dir, name) to pass to `lirdrec_jax.data.load_mmrec`.
    """
    data_dir = default_dataset_dir()
    if data_dir.exists():
        if not _is_complete(data_dir, DEFAULT_NAME):
            raise DataError(f'{data_dir} exists but lacks one of {DEFAULT_NAME}/'
                            f'{DEFAULT_NAME}.inter, image_feat.npy, text_feat.npy; expected the '
                            f'complete generated default dataset. Delete {data_dir} to '
                            f'regenerate it.')
        _add_missing_model_inputs(data_dir / DEFAULT_NAME, DEFAULT_NAME)
        return data_dir, DEFAULT_NAME
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stay on the renamed folder.
    tmp = data_dir.parent / f'.{DEFAULT_VERSION}-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    tmp.mkdir()
    try:
        write_synthetic_dataset(tmp, DEFAULT_NAME)
        try:
            os.rename(tmp, data_dir)
        except OSError:
            if not _is_complete(data_dir, DEFAULT_NAME):
                raise  # not a concurrent winner: a real failure
            # Another process finished first; its copy is identical, keep it.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return data_dir, DEFAULT_NAME
