"""DGVAE's word view: each user's TF-IDF over the words of the user's training items.

DGVAE (arXiv 2402.16110; reference enoche/DGVAE) reads one sparse row per user besides the
interactions: the TF-IDF weights of the words in the texts of the items the user trained on
(title, brand, categories, description, and the first words of an image-to-text output). This
module is the pure builder; `python -m data_prep.words` reads a dataset folder and calls it, and
the embedded default dataset (`lirdrec_jax.synthetic`) is given its word view by it.

The definitions are those of scikit-learn's `TfidfVectorizer(min_df=5, max_df=0.6)` with every
other option at its default, which is the call of the reference's preprocessing notebook
(scikit-learn is not needed here):
  documents  one per user u = 0..n_users-1 (row u is user u): the texts of the user's TRAINING
             items (x_label 0) only, once per training row, so an item listed twice counts
             twice. Valid and test items never enter a document. A user without a training
             item has an empty document and a zero row; it still counts in n below.
  tokens     the document lower-cased (`str.lower`), then every match of the pattern
             r"(?u)\\b\\w\\w+\\b": runs of two or more word characters (letters of any script,
             digits, underscore). Single characters and punctuation are dropped; no stop
             words, no stemming, no accent stripping, single words only.
  tf         the raw count of the term in the document (no sublinear scaling).
  df         the number of documents that contain the term. A term is kept when
             min_df <= df <= max_df, where an integer bound counts documents and a float bound
             in [0, 1] is a fraction of n (max_df=0.6 keeps df <= 0.6 * n). Terms that occur
             in no document are not part of the vocabulary at all. No max_features cap.
  idf        ln((1 + n) / (1 + df)) + 1, n = the number of documents (`smooth_idf=True`).
  weight     tf * idf, each row then divided by its L2 norm (`norm='l2'`); a row without a
             kept term stays zero.
  columns    the kept terms in code-point order of their strings (Python's `sorted`), as
             scikit-learn orders its vocabulary; the vocabulary file lists them in that order.

How the item texts are joined: the reference's notebook concatenates an item's text and its
image words, and a user's item texts, with no separator, so the last word of one piece and the
first word of the next fuse into one token ("...diaper" + "Baby..." -> "diaperbaby"). By
default this module joins with a space, so every word stays a word; `fused_joins=True`
reproduces the notebook (see docs/reference_quirks.md).

Numbers: counts are exact integers; idf is computed per term with `math.log` and the row sums
of squares run in float64 in column order (`np.bincount`, a sequential sum), so the float32
output is the same on every machine up to the last bit of the C library's logarithm.

This module imports nothing of `data_prep`.
"""
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp

PathLike = Union[str, os.PathLike]
Bound = Union[int, float]

# scikit-learn's default token pattern (CountVectorizer / TfidfVectorizer).
TOKEN_PATTERN = re.compile(r'(?u)\b\w\w+\b')
# The reference notebook's TfidfVectorizer(min_df=5, max_df=0.6).
MIN_DF: Bound = 5
MAX_DF: Bound = 0.6
# The notebook keeps the first 5 words of each item's image-to-text output.
IMAGE_WORDS = 5
# Default file names in the dataset folder (the reference names them `<dataset>.vocab`, a JSON
# {word: column} dict, and `<dataset>.user.words.tfidf.npz`).
WORDS_FILE = 'user_words_tfidf.npz'
VOCAB_FILE = 'user_words_vocab.txt'
# The item texts in a dataset folder (`data_prep.amazon` / `movielens` and the synthetic
# generator write it).
ITEM_TEXT_FILE = 'item_text.jsonl'


class WordView(NamedTuple):
    """The word view of a dataset.

    Attributes:
      matrix: (n_users, n_words) float32 `scipy.sparse.csr_matrix`, row u = user u's L2-
        normalised TF-IDF, indices sorted within each row.
      vocabulary: (n_words,) the word of each column, in column order.
      idf: (n_words,) float64 idf of each column.
      stats: counts for manifests and reports (documents, empty documents, terms seen, terms
        dropped by each bound, terms kept, non-zeros).
    """
    matrix: sp.csr_matrix
    vocabulary: Tuple[str, ...]
    idf: np.ndarray
    stats: Dict[str, int]


# --------------------------------------------------------------------------- texts


def tokenize(text: str) -> List[str]:
    """The tokens of one document: lower-cased, then every match of `TOKEN_PATTERN`."""
    return TOKEN_PATTERN.findall(text.lower())


def first_words(text: Optional[str], n: int) -> str:
    """The first `n` whitespace-separated words of `text`, joined by single spaces ('' for
    None); n <= 0 keeps every word. The reference applies this (n=5) to its image-to-text
    output, a list of words ranked by image-word similarity."""
    if not text:
        return ''
    words = text.split()
    return ' '.join(words if n <= 0 else words[:n])


def item_document(text: Optional[str], image_text: Optional[str],
                  image_words: int = IMAGE_WORDS, fused_joins: bool = False) -> str:
    """One item's part of a user document: its text, then the first `image_words` words of its
    image-to-text output. Joined by a space, or by nothing with `fused_joins` (the reference's
    concatenation, which fuses the text's last word with the first image word)."""
    joiner = '' if fused_joins else ' '
    parts = [p for p in (text or '', first_words(image_text, image_words)) if p]
    return joiner.join(parts)


# --------------------------------------------------------------------------- counting


def term_counts(docs: Sequence[str]) -> Tuple[sp.csr_matrix, Tuple[str, ...]]:
    """Token counts of each document.

    Args:
      docs: (n_docs,) texts.

    Returns:
      ((n_docs, n_terms) int64 CSR of counts, sorted indices; the terms in code-point order).
    """
    index: Dict[str, int] = {}
    rows: List[np.ndarray] = []
    cols: List[np.ndarray] = []
    vals: List[np.ndarray] = []
    for d, doc in enumerate(docs):
        counts = Counter(tokenize(doc))
        if not counts:
            continue
        ids = [index.setdefault(t, len(index)) for t in counts]
        rows.append(np.full(len(ids), d, dtype=np.int64))
        cols.append(np.asarray(ids, dtype=np.int64))
        vals.append(np.fromiter(counts.values(), dtype=np.int64, count=len(ids)))
    terms = sorted(index)
    # Columns in code-point order of the terms, as scikit-learn sorts its vocabulary.
    new_col = np.empty(len(terms), dtype=np.int64)
    for new, term in enumerate(terms):
        new_col[index[term]] = new
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
    matrix = sp.csr_matrix((cat(vals), (cat(rows), new_col[cat(cols)])),
                           shape=(len(docs), len(terms)), dtype=np.int64)
    matrix.sort_indices()
    return matrix, tuple(terms)


def training_matrix(train_users: np.ndarray, train_items: np.ndarray, n_users: int,
                    n_items: int) -> sp.csr_matrix:
    """(n_users, n_items) int64 CSR: how often each (user, item) pair is a training row."""
    users = np.asarray(train_users, dtype=np.int64)
    items = np.asarray(train_items, dtype=np.int64)
    if users.shape != items.shape:
        raise ValueError(f'train_users has shape {users.shape} but train_items {items.shape}; '
                         f'expected equal lengths')
    return sp.csr_matrix((np.ones(users.size, dtype=np.int64), (users, items)),
                         shape=(n_users, n_items))


def user_term_counts(item_docs: Sequence[str], train_users: np.ndarray,
                     train_items: np.ndarray, n_users: int, fused_joins: bool = False
                     ) -> Tuple[sp.csr_matrix, Tuple[str, ...]]:
    """Token counts of each user's document (its training items' documents joined).

    With space joins the tokens of a user document are those of its items, so the counts are
    the training matrix times the item counts (items tokenised once). With `fused_joins` the
    items are concatenated without a separator in training-row order, as the reference does,
    and each user document is tokenised as a whole.

    Args:
      item_docs: (n_items,) each item's document (`item_document`).
      train_users, train_items: (n,) ids of the TRAINING interactions (x_label 0) only, in
        file order.
      n_users: rows of the result.

    Returns:
      ((n_users, n_terms) int64 CSR, sorted indices; the terms, every one in some document).
    """
    if fused_joins:
        lists: List[List[int]] = [[] for _ in range(n_users)]
        for u, i in zip(np.asarray(train_users).tolist(), np.asarray(train_items).tolist()):
            lists[u].append(i)
        return term_counts([''.join(item_docs[i] for i in items) for items in lists])
    item_counts, terms = term_counts(item_docs)
    counts = (training_matrix(train_users, train_items, n_users, len(item_docs))
              @ item_counts).tocsr()
    counts.sort_indices()
    # Terms of items nobody trained on are not in any document: not in the vocabulary.
    used = np.flatnonzero(np.bincount(counts.indices, minlength=len(terms)))
    return counts[:, used].tocsr(), tuple(terms[j] for j in used)


# --------------------------------------------------------------------------- tf-idf


def document_count_bound(value: Bound, n_docs: int, name: str) -> float:
    """A min_df / max_df bound as a document count: an int counts documents, a float in
    [0, 1] is a fraction of `n_docs` (scikit-learn's convention)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise ValueError(f'{name}={value!r}; expected an int (a number of documents) or a '
                         f'float in [0, 1] (a fraction of them)')
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f'{name}={value}; expected a document count >= 0')
        return float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name}={value}; expected a fraction in [0, 1] (or an int count)')
    return float(value) * n_docs


def select_terms(counts: sp.csr_matrix, terms: Sequence[str], min_df: Bound, max_df: Bound
                 ) -> Tuple[sp.csr_matrix, Tuple[str, ...], Dict[str, int]]:
    """Keeps the terms with min_df <= df <= max_df (`document_count_bound`).

    Returns:
      (the counts of the kept columns, their terms, {'terms_seen', 'terms_below_min_df',
      'terms_above_max_df', 'terms_kept'}).
    """
    n_docs = counts.shape[0]
    low = document_count_bound(min_df, n_docs, 'min_df')
    high = document_count_bound(max_df, n_docs, 'max_df')
    if high < low:
        raise ValueError(f'max_df={max_df!r} allows at most {high:g} documents per word but '
                         f'min_df={min_df!r} asks for at least {low:g} (of {n_docs}); expected '
                         f'max_df >= min_df')
    df = np.bincount(counts.indices, minlength=counts.shape[1])
    keep = (df >= low) & (df <= high)
    stats = {'terms_seen': int(df.size), 'terms_below_min_df': int((df < low).sum()),
             'terms_above_max_df': int((df > high).sum()), 'terms_kept': int(keep.sum())}
    if not keep.any():
        raise ValueError(f'no word is left: of {df.size} words in {n_docs} user documents, '
                         f'{stats["terms_below_min_df"]} occur in fewer than min_df={min_df!r} '
                         f'documents and {stats["terms_above_max_df"]} in more than '
                         f'max_df={max_df!r}; expected a lower min_df or a higher max_df')
    cols = np.flatnonzero(keep)
    kept = counts[:, cols].tocsr()
    kept.sort_indices()
    return kept, tuple(terms[j] for j in cols), stats


def smooth_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """(n_terms,) float64 ln((1 + n_docs) / (1 + df)) + 1, one `math.log` per term."""
    return np.array([math.log((n_docs + 1.0) / (d + 1.0)) + 1.0 for d in df.tolist()],
                    dtype=np.float64)


def tfidf_rows(counts: sp.csr_matrix) -> Tuple[sp.csr_matrix, np.ndarray]:
    """L2-normalised tf * smooth idf of a count matrix.

    Args:
      counts: (n_docs, n_terms) CSR of token counts, sorted indices, no explicit zeros.

    Returns:
      ((n_docs, n_terms) float32 CSR, (n_terms,) float64 idf).
    """
    n_docs, n_terms = counts.shape
    idf = smooth_idf(np.bincount(counts.indices, minlength=n_terms), n_docs)
    weights = counts.data.astype(np.float64) * idf[counts.indices]
    row = np.repeat(np.arange(n_docs), np.diff(counts.indptr))
    # A sequential sum in column order per row (bincount adds its weights one by one).
    norms = np.sqrt(np.bincount(row, weights=weights * weights, minlength=n_docs))
    weights = weights / norms[row]
    # Stored as float32: the reference saves float64, but its model reads the rows as float32.
    matrix = sp.csr_matrix((weights.astype(np.float32), counts.indices.copy(),
                            counts.indptr.copy()), shape=(n_docs, n_terms))
    return matrix, idf


def build_word_view(item_docs: Sequence[str], train_users: np.ndarray, train_items: np.ndarray,
                    n_users: int, *, min_df: Bound = MIN_DF, max_df: Bound = MAX_DF,
                    fused_joins: bool = False) -> WordView:
    """The word view (see the module docstring for every definition).

    Args:
      item_docs: (n_items,) each item's document, e.g. `item_document(text, image_text)`;
        '' for an item without text.
      train_users, train_items: (n,) the TRAINING interactions (x_label 0) only, in file
        order (the order matters only with `fused_joins`).
      n_users: rows of the result (user u = row u).
      min_df, max_df: the document-frequency bounds.
      fused_joins: join a user's item documents without a separator (the reference's
        concatenation) instead of with a space.

    Returns:
      The `WordView`.
    """
    # Row u is user u. The reference orders its rows by first appearance in the .inter file,
    # which is the same only because MMRec's files are sorted by userID.
    counts, terms = user_term_counts(item_docs, train_users, train_items, n_users, fused_joins)
    counts, terms, stats = select_terms(counts, terms, min_df, max_df)
    matrix, idf = tfidf_rows(counts)
    per_user = np.bincount(np.asarray(train_users, dtype=np.int64), minlength=n_users)
    stats.update({'documents': int(n_users), 'empty_documents': int((per_user == 0).sum()),
                  'documents_without_a_kept_word': int((np.diff(counts.indptr) == 0).sum()),
                  'nonzeros': int(matrix.nnz)})
    return WordView(matrix, terms, idf, stats)


# --------------------------------------------------------------------------- files


def atomic_write(path: Path, write) -> None:
    """`write(binary file)` into a temp file of the same folder, then os.replace: a reader
    never sees a truncated file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}-', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_vocabulary(vocabulary: Sequence[str]) -> bytes:
    """The vocabulary file: one word per line, column order, UTF-8, '\\n' line ends."""
    return ''.join(w + '\n' for w in vocabulary).encode('utf-8')


def save_word_view(view: WordView, words_path: PathLike, vocab_path: PathLike) -> None:
    """Writes the matrix (`scipy.sparse.save_npz`) and the vocabulary file, each atomically."""
    atomic_write(Path(words_path), lambda f: sp.save_npz(f, view.matrix))
    data = format_vocabulary(view.vocabulary)
    atomic_write(Path(vocab_path), lambda f: f.write(data))


def read_vocabulary(path: PathLike, width: Optional[int] = None) -> Tuple[str, ...]:
    """The words of a vocabulary file, column order; ValueError when it does not have
    `width` lines (the matrix's column count) or has a blank or repeated word."""
    text = Path(path).read_text(encoding='utf-8')
    words = text.split('\n')
    if words and words[-1] == '':
        words.pop()
    for number, word in enumerate(words, 1):
        if not word.strip():
            raise ValueError(f'{path}, line {number}: blank; expected one word per line')
    if len(set(words)) != len(words):
        raise ValueError(f'{path}: a word appears twice; expected each column\'s word once')
    if width is not None and len(words) != width:
        raise ValueError(f'{path}: {len(words)} words but the matrix has {width} columns; '
                         f'expected one word per column (files of different builds?)')
    return tuple(words)
