"""The MMRec dataset layout: reading, validating and caching it, and the conventions of its split.

MMRec layout (one folder per dataset, `<data_dir>/<name>/`):
  <name>.inter     tab-separated text, line 1 a header naming at least the columns `userID`,
                   `itemID` and `x_label` (any order; other columns such as `rating` and
                   `timestamp` are ignored). Ids are 0-based integers; x_label 0/1/2 marks the
                   train/valid/test split.
  image_feat.npy   (n_items, d_v) float array, row i describing item i (optional).
  text_feat.npy    (n_items, d_t) float array, row i describing item i (optional; at least one
                   of the two feature files must exist).

The conversion (`convert_mmrec`, cached as `.npz`; `lirdrec_jax.data.load_mmrec` reads the
cache) reproduces the reference's (MMRec's) reading of these files:
  * n_users = max(userID over all rows) + 1 and n_items = max(itemID over all rows) + 1,
    counting rows of every split, including the ones dropped below;
  * each split keeps the row order of the file, and duplicate (user, item) rows stay (their
    count and first line are reported once, as a warning, when the cache is built);
  * valid/test rows whose user has no train row are dropped (MMRec cannot rank for them).

Integer feature files are converted to float32 with one warning per file, also when the cache
is built; a run that reuses the cache reads float32 arrays and says nothing. The cache is keyed
on the content (SHA-256) of the source files; when it cannot be written (read-only folder, disk
full), `lirdrec_jax.data.load_mmrec` warns and trains from the arrays in memory.

Also here, because both the data commands (`data_prep`) and the synthetic generator
(`lirdrec_jax.synthetic`) write this layout: `format_inter` (the `.inter` text) and MMRec's
preprocessing conventions, `k_core` (iterated k-core filter) and `temporal_split` (per-user
chronological split into x_label 0/1/2).

The command-line front end is `python -m data_prep.mmrec` (data_prep/mmrec.py).
"""
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file, the line or field, and
    what was expected."""


class CacheWriteError(DataError):
    """The converted arrays could not be written to the cache (the message names the path and
    the option that moves the cache)."""


def warn(message: str) -> None:
    """One `warning: ...` line on stderr: the input is used, but the user should know."""
    print(f'warning: {message}', file=sys.stderr, flush=True)


REQUIRED_COLUMNS = ('userID', 'itemID', 'x_label')
SPLIT_NAMES = ('train', 'valid', 'test')
CACHE_DIRNAME = '.lirdrec_jax_cache'
# Bump when the cache's content or meaning changes, so that old caches count as stale.
# 2: keyed on the SHA-256 of each source file (1: on name, size and mtime).
CACHE_FORMAT = 2
# Where the cache goes instead, for messages (data_prep.mmrec spells it --cache_dir DIR).
CACHE_OPTION = '--config.data.cache_dir=DIR'
# Ids are stored as int32 (as the model's index arrays); larger ids cannot be represented.
MAX_ID = np.iinfo(np.int32).max - 1

# The columns written by `format_inter` (readers need only userID, itemID and x_label).
INTER_HEADER = ('userID', 'itemID', 'rating', 'timestamp', 'x_label')

LAYOUT_HINT = ('MMRec layout: <data_dir>/<name>/<name>.inter (tab-separated, header with '
               'userID, itemID, x_label) plus image_feat.npy and/or text_feat.npy of shape '
               '(n_items, d)')


class InterColumns(NamedTuple):
    """The three columns of a `.inter` file that matter, in file order.

    Attributes:
      users: (n,) int64 user ids.
      items: (n,) int64 item ids.
      labels: (n,) int64 x_label values, each 0, 1 or 2.
      line_numbers: (n,) int64 1-based line of each row in the file (the header is line 1).
    """
    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    line_numbers: np.ndarray


class Splits(NamedTuple):
    """The dataset's splits and the counts the conversion reports.

    Attributes:
      n_users: max user id + 1 over all rows.
      n_items: max item id + 1 over all rows.
      arrays: `<split>_users` / `<split>_items` -> (n_split,) int32, file order.
      dropped: split name ('valid' / 'test') -> number of cold-start rows dropped.
    """
    n_users: int
    n_items: int
    arrays: Dict[str, np.ndarray]
    dropped: Dict[str, int]


# --------------------------------------------------------------------------- paths


def inter_path(dataset_dir: PathLike, name: str) -> Path:
    """`<dataset_dir>/<name>.inter`."""
    return Path(dataset_dir) / f'{name}.inter'


def default_cache_path(dataset_dir: PathLike, name: str) -> Path:
    """`<dataset_dir>/.lirdrec_jax_cache/<name>.npz`, next to (never over) the source files."""
    return Path(dataset_dir) / CACHE_DIRNAME / f'{name}.npz'


def check_layout(dataset_dir: PathLike, name: str) -> Path:
    """Raises DataError unless the dataset folder and its `.inter` file exist.

    Returns:
      The path of the `.inter` file.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DataError(f'dataset folder {dataset_dir} does not exist (or is not a folder); '
                        f'expected {LAYOUT_HINT}')
    path = inter_path(dataset_dir, name)
    if not path.is_file():
        found = sorted(p.name for p in dataset_dir.iterdir())[:10]
        raise DataError(f'interaction file {path} does not exist; expected {LAYOUT_HINT}. '
                        f'Files found in {dataset_dir}: {found}')
    return path


# --------------------------------------------------------------------------- .inter parsing


def _read_lines(path: Path) -> list:
    """The file's lines without line terminators ('\\n' or '\\r\\n')."""
    try:
        # utf-8-sig: a byte-order mark written by some editors must not become part of 'userID'.
        text = path.read_text(encoding='utf-8-sig')
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text ({e}); expected a tab-separated .inter '
                        f'file') from e
    if '\r' in text:
        text = text.replace('\r\n', '\n')  # files written on Windows
    lines = text.split('\n')
    if lines and lines[-1] == '':
        lines.pop()  # the terminator of the last line
    return lines


def parse_header(header: str, path: Path) -> Tuple[int, Dict[str, int]]:
    """Locates the required columns in the header line.

    Args:
      header: line 1 of the file.
      path: the file, for messages.

    Returns:
      (number of columns, {required column name: its 0-based index}).
    """
    columns = [c.strip() for c in header.split('\t')]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f'{path}, line 1 (header): missing required column(s) {missing}; '
                        f'found columns {columns}; expected a tab-separated header containing '
                        f'{list(REQUIRED_COLUMNS)}')
    repeated = [c for c in REQUIRED_COLUMNS if columns.count(c) > 1]
    if repeated:
        raise DataError(f'{path}, line 1 (header): column(s) {repeated} appear more than once '
                        f'in {columns}; expected each exactly once')
    return len(columns), {c: columns.index(c) for c in REQUIRED_COLUMNS}


def _parse_int_column(fields: Sequence[str], column: str, line_numbers: np.ndarray,
                      path: Path) -> np.ndarray:
    """(n,) int64 values of one column; DataError naming the first non-integer field."""
    try:
        return np.fromiter(map(int, fields), dtype=np.int64, count=len(fields))
    except (ValueError, OverflowError):
        pass
    # Slow path, only to name the offending line.
    for text, line in zip(fields, line_numbers):
        try:
            value = int(text)
        except ValueError:
            raise DataError(f'{path}, line {line}: column {column} is {text!r}; expected an '
                            f'integer') from None
        if abs(value) > np.iinfo(np.int64).max:
            raise DataError(f'{path}, line {line}: column {column} is {text!r}; expected '
                            f'an integer that fits in 64 bits') from None
    raise AssertionError('unreachable: fast integer parse failed but every field parsed')


def read_inter(path: PathLike) -> InterColumns:
    """Reads and validates the userID, itemID and x_label columns of a `.inter` file.

    Blank lines are skipped (as pandas does); line numbers in messages are the file's own.

    Args:
      path: the `.inter` file.

    Returns:
      The columns in file order.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines or not lines[0].strip():
        raise DataError(f'{path}, line 1: empty; expected a tab-separated header containing '
                        f'{list(REQUIRED_COLUMNS)}')
    n_columns, index = parse_header(lines[0], path)
    body = lines[1:]
    keep = [i for i, ln in enumerate(body) if ln.strip()]
    if len(keep) != len(body):
        body = [body[i] for i in keep]
    line_numbers = np.asarray(keep, dtype=np.int64) + 2  # +1 for the header, +1 for 1-based

    rows = [ln.split('\t') for ln in body]
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero(counts != n_columns)
    if bad.size:
        i = int(bad[0])
        raise DataError(f'{path}, line {line_numbers[i]}: {counts[i]} tab-separated fields; '
                        f'expected {n_columns} as in the header ({len(bad)} such line(s) in all)')

    values = {}
    for column in REQUIRED_COLUMNS:
        c = index[column]
        values[column] = _parse_int_column([r[c] for r in rows], column, line_numbers, path)

    for column in ('userID', 'itemID'):
        col = values[column]
        bad = np.flatnonzero((col < 0) | (col > MAX_ID))
        if bad.size:
            i = int(bad[0])
            raise DataError(f'{path}, line {line_numbers[i]}: {column} is {col[i]}; expected a '
                            f'0-based id in [0, {MAX_ID}]')
    labels = values['x_label']
    bad = np.flatnonzero((labels < 0) | (labels > 2))
    if bad.size:
        i = int(bad[0])
        raise DataError(f'{path}, line {line_numbers[i]}: x_label is {labels[i]}; expected 0 '
                        f'(train), 1 (valid) or 2 (test)')
    return InterColumns(values['userID'], values['itemID'], labels, line_numbers)


def split_interactions(columns: InterColumns, path: PathLike) -> Splits:
    """Splits rows by x_label and drops cold-start valid/test rows, as the reference does.

    Args:
      columns: the parsed `.inter` columns.
      path: the `.inter` file, for messages.

    Returns:
      The splits (int32, file order) with n_users / n_items counted over all rows.
    """
    users, items, labels = columns.users, columns.items, columns.labels
    if users.size == 0:
        raise DataError(f'{path}: no interaction rows after the header; expected at least one '
                        f'row per split (x_label 0, 1 and 2)')
    n_users = int(users.max()) + 1
    n_items = int(items.max()) + 1

    train = labels == 0
    if not train.any():
        raise DataError(f'{path}: the train split is empty (no row has x_label 0); expected '
                        f'at least one train row')
    in_train = np.zeros(n_users, dtype=bool)
    in_train[users[train]] = True

    arrays = {'train_users': users[train].astype(np.int32),
              'train_items': items[train].astype(np.int32)}
    dropped = {}
    for label, split in ((1, 'valid'), (2, 'test')):
        rows = labels == label
        # A user without train rows has no embedding history to rank from; MMRec drops them.
        kept = rows & in_train[users]
        dropped[split] = int(rows.sum() - kept.sum())
        if not kept.any():
            raise DataError(f'{path}: the {split} split is empty ({int(rows.sum())} row(s) with '
                            f'x_label {label}, {dropped[split]} dropped because their user has '
                            f'no train row); expected at least one {split} row of a train user')
        arrays[f'{split}_users'] = users[kept].astype(np.int32)
        arrays[f'{split}_items'] = items[kept].astype(np.int32)
    return Splits(n_users, n_items, arrays, dropped)


def find_duplicates(columns: InterColumns) -> Tuple[int, Optional[Tuple[int, int]]]:
    """Rows whose (user, item) pair appeared on an earlier row, whatever the splits.

    Returns:
      (number of such rows, (index of the first such row, index of the row it repeats)) with
      indices into the columns; (0, None) when every pair is distinct.
    """
    users, items = columns.users, columns.items
    if users.size < 2:
        return 0, None
    key = users * (int(items.max()) + 1) + items  # ids < 2**31, so no int64 overflow
    order = np.argsort(key, kind='stable')  # equal keys stay in file order
    later = order[np.flatnonzero(key[order][1:] == key[order][:-1]) + 1]
    if not later.size:
        return 0, None
    first = int(later.min())
    return int(later.size), (first, int(np.flatnonzero(key == key[first])[0]))


def report_duplicates(columns: InterColumns, path: PathLike) -> int:
    """Warns once when (user, item) pairs repeat; returns their count. The rows stay: MMRec
    keeps them in its interaction lists (docs/reference_quirks.md, R11)."""
    count, where = find_duplicates(columns)
    if count:
        row, earlier = where
        warn(f'{path}: {count} duplicate (user, item) row(s), kept as MMRec keeps them; the '
             f'first: line {columns.line_numbers[row]} repeats user {columns.users[row]}, item '
             f'{columns.items[row]} of line {columns.line_numbers[earlier]}')
    return count


# --------------------------------------------------------------------------- features


def validate_features(feat: np.ndarray, path: PathLike, n_items: int,
                      largest_item: str = '') -> np.ndarray:
    """Checks one feature matrix and returns it as float32.

    Args:
      feat: the loaded array, expected (n_items, d).
      path: its file, for messages.
      n_items: max item id + 1 from the `.inter` file.
      largest_item: where that id is, for messages ('<file>, line L has itemID I'); '' = unknown.

    Returns:
      (n_items, d) float32.
    """
    if feat.dtype == object or not (np.issubdtype(feat.dtype, np.floating)
                                    or np.issubdtype(feat.dtype, np.integer)):
        raise DataError(f'{path}: dtype {feat.dtype}; expected a float array of shape '
                        f'(n_items={n_items}, d)')
    if feat.ndim != 2:
        raise DataError(f'{path}: shape {feat.shape} is {feat.ndim}-D; expected a 2-D array of '
                        f'shape (n_items={n_items}, d)')
    if feat.shape[0] != n_items:
        source = (f'{largest_item} (the largest, so n_items={n_items})' if largest_item else
                  f'the .inter file has n_items={n_items} (max itemID + 1)')
        raise DataError(f'{path}: {feat.shape[0]} rows but {source}; expected one row per item, '
                        f'row i describing item i')
    if feat.shape[1] == 0:
        raise DataError(f'{path}: shape {feat.shape} has no feature columns; expected (n_items, d) '
                        f'with d >= 1')
    with np.errstate(over='ignore', invalid='ignore'):  # overflow is reported just below
        feat = np.asarray(feat, dtype=np.float32)
    finite = np.isfinite(feat).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f'{path}: row {row} (item {row}) contains NaN or Inf (after conversion '
                        f'to float32); expected finite values ({int((~finite).sum())} bad row(s))')
    zero = ~feat.any(axis=1)
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise DataError(f'{path}: row {row} (item {row}) is all zeros; expected a non-zero '
                        f'vector for every item, since the cosine kNN item graph divides by the '
                        f'row norm ({int(zero.sum())} zero row(s))')
    return feat


def load_npy(path: Path, where: str, readable_as: str = 'a .npy array') -> np.ndarray:
    """The array saved in `path` (no pickles); DataError naming `where` when the file cannot be
    read (expected `readable_as`) or is not a .npy array."""
    try:
        with open(path, 'rb') as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f'{where}: cannot be read ({e}); expected {readable_as}') from e
    if magic != b'\x93NUMPY':
        # Checked here because np.load would report any non-.npy file as "pickled data".
        raise DataError(f'{where}: cannot be loaded as a .npy array (the file does not start '
                        f'with the .npy magic bytes \\x93NUMPY, it starts with {magic!r}); '
                        f'expected a float array saved with numpy.save')
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # any failure means the file is not a usable .npy array
        raise DataError(f'{where}: cannot be loaded as a .npy array ({type(e).__name__}: {e}); '
                        f'expected a float array saved with numpy.save') from e


def load_features(path: PathLike, n_items: int, largest_item: str = '') -> np.ndarray:
    """Loads and validates one `.npy` feature file; returns (n_items, d) float32.

    An integer file is converted with one warning: MMRec's feature files are float, so integer
    values (exact in float32 only up to 2**24) are more likely a mistake than a choice.
    `largest_item`: see `validate_features`.
    """
    path = Path(path)
    feat = load_npy(path, str(path), 'a .npy feature file')
    converted = validate_features(feat, path, n_items, largest_item)
    if np.issubdtype(feat.dtype, np.integer):
        warn(f'{path}: dtype {feat.dtype} converted to float32 (expected a float array; the '
             f'integer values are used as they are)')
    return converted


# --------------------------------------------------------------------------- cache


HASH_CHUNK = 1 << 20  # bytes read at a time: memory stays flat for any file size


def _file_digest(path: Path):
    """[name, SHA-256 hex digest of the content] of a file, or None when absent."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b''):
            digest.update(chunk)
    return [path.name, digest.hexdigest()]


def source_fingerprint(dataset_dir: PathLike, name: str, *, image_file: str = 'image_feat.npy',
                       text_file: str = 'text_feat.npy') -> str:
    """A string that changes whenever a source file is replaced, edited, added or removed.

    Built from the file names and the SHA-256 of their contents, so that an edit that keeps the
    size and restores the modification time (a copy with `cp -p`, a checkout) is still seen.
    Every run pays for it: SHA-256 (with the CPU's SHA extensions as fast as sha1 and twice as
    fast as md5 or blake2b) hashes Baby's 115 MB image features in 0.1-0.2 s.
    """
    dataset_dir = Path(dataset_dir)
    return json.dumps({
        'format': CACHE_FORMAT,
        'inter': _file_digest(inter_path(dataset_dir, name)),
        'image': _file_digest(dataset_dir / image_file) if image_file else None,
        'text': _file_digest(dataset_dir / text_file) if text_file else None,
    }, sort_keys=True)


def cache_is_fresh(dataset_dir: PathLike, name: str, cache_path: Optional[PathLike] = None, *,
                   image_file: str = 'image_feat.npy', text_file: str = 'text_feat.npy') -> bool:
    """True when `cache_path` exists, is readable and was built from the current source files
    (the same contents, see `source_fingerprint`) by this cache format.

    Never raises for missing or unreadable files, or for a cache written with an older key:
    those just make the cache not fresh.
    """
    cache_path = Path(cache_path) if cache_path else default_cache_path(dataset_dir, name)
    if not cache_path.is_file() or not inter_path(dataset_dir, name).is_file():
        return False
    try:
        with np.load(cache_path, allow_pickle=False) as z:
            stored = str(z['source_fingerprint'])
    except Exception:  # a truncated or foreign file is simply rebuilt
        return False
    return stored == source_fingerprint(dataset_dir, name, image_file=image_file,
                                        text_file=text_file)


def _write_npz_atomic(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Writes `arrays` to `path` via a temp file in the same folder and `os.replace`.

    A crash mid-write leaves at most a stray temp file, never a truncated cache that a later
    run would trust; a failed write (no permission, disk full) removes its temp file and raises
    CacheWriteError.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.stem}-', suffix='.npz.tmp')
    except OSError as e:
        raise _cache_write_error(path, e) from e
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cache_write_error(path, e) from e
        raise


def _cache_write_error(path: Path, err: OSError) -> CacheWriteError:
    reason = f'{err.strerror}: {err.filename}' if err.strerror and err.filename else err
    return CacheWriteError(f'cannot write the dataset cache {path} ({reason}); choose a writable '
                           f'folder with {CACHE_OPTION} (python -m data_prep.mmrec: --cache_dir '
                           f'DIR)')


def prepare_arrays(dataset_dir: PathLike, name: str, *, image_file: str = 'image_feat.npy',
                   text_file: str = 'text_feat.npy'
                   ) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    """Reads and validates every source file of a dataset.

    Args:
      dataset_dir: the folder `<data_dir>/<name>` holding `<name>.inter` and the features.
      name: the dataset name (stem of the `.inter` file).
      image_file, text_file: feature file names inside `dataset_dir` ('' = not used).

    Returns:
      (arrays, stats): arrays holds the cache's keys except the fingerprint; stats holds
      n_users, n_items, the per-split row counts and `dropped_valid` / `dropped_test`, the
      cold-start rows removed.
    """
    dataset_dir = Path(dataset_dir)
    path = check_layout(dataset_dir, name)
    columns = read_inter(path)
    splits = split_interactions(columns, path)
    report_duplicates(columns, path)
    top = int(np.argmax(columns.items))  # the first row holding the largest item id
    largest_item = f'{path}, line {columns.line_numbers[top]} has itemID {columns.items[top]}'

    feature_paths = {key: dataset_dir / fname
                     for key, fname in (('image_feat', image_file), ('text_feat', text_file))
                     if fname}
    present = {key: p for key, p in feature_paths.items() if p.is_file()}
    if not present:
        raise DataError(f'{dataset_dir}: neither feature file exists (looked for '
                        f'{[str(p) for p in feature_paths.values()]}); expected at least one of '
                        f'them, of shape (n_items={splits.n_items}, d)')

    arrays = {'n_users': np.int64(splits.n_users), 'n_items': np.int64(splits.n_items),
              'dropped_valid': np.int64(splits.dropped['valid']),
              'dropped_test': np.int64(splits.dropped['test'])}
    arrays.update(splits.arrays)
    for key, p in present.items():
        arrays[key] = load_features(p, splits.n_items, largest_item)
    return arrays, summary_stats(arrays)


def convert_arrays(dataset_dir: PathLike, name: str, *, image_file: str = 'image_feat.npy',
                   text_file: str = 'text_feat.npy') -> Dict[str, np.ndarray]:
    """The cache's arrays (see `convert_mmrec`), source_fingerprint included, without writing
    them; arguments as for `convert_mmrec`."""
    # Fingerprint before reading, so that a file changed during the read makes the cache stale.
    fingerprint = source_fingerprint(dataset_dir, name, image_file=image_file,
                                     text_file=text_file)
    arrays, _ = prepare_arrays(dataset_dir, name, image_file=image_file, text_file=text_file)
    arrays['source_fingerprint'] = np.str_(fingerprint)
    return arrays


def write_cache(cache_path: PathLike, arrays: Dict[str, np.ndarray]) -> Path:
    """Writes `convert_arrays`' result atomically; CacheWriteError when that fails."""
    _write_npz_atomic(Path(cache_path), arrays)
    return Path(cache_path)


def convert_mmrec(dataset_dir: PathLike, name: str, *, image_file: str = 'image_feat.npy',
                  text_file: str = 'text_feat.npy',
                  cache_path: Optional[PathLike] = None) -> Path:
    """Converts an MMRec dataset folder into a cached `.npz` (always rebuilds).

    The `.npz` holds n_users, n_items, {train,valid,test}_{users,items} (int32, file order),
    image_feat / text_feat ((n_items, d) float32, only those present), dropped_valid /
    dropped_test (cold-start rows removed) and source_fingerprint (see `cache_is_fresh`).

    Args:
      dataset_dir: the folder `<data_dir>/<name>` holding `<name>.inter` and the features.
      name: the dataset name (stem of the `.inter` file).
      image_file, text_file: feature file names inside `dataset_dir` ('' = not used).
      cache_path: where to write; default `<dataset_dir>/.lirdrec_jax_cache/<name>.npz`.

    Returns:
      The cache path.

    Raises:
      DataError: a source file is missing or malformed; CacheWriteError (a DataError): the
        cache cannot be written.
    """
    cache_path = Path(cache_path) if cache_path else default_cache_path(dataset_dir, name)
    return write_cache(cache_path, convert_arrays(dataset_dir, name, image_file=image_file,
                                                  text_file=text_file))


# --------------------------------------------------------------------------- summary


def summary_stats(arrays) -> Dict[str, object]:
    """Counts shown by the CLI, from the cache arrays (a dict or an open `.npz`)."""
    n_users, n_items = int(arrays['n_users']), int(arrays['n_items'])
    stats = {'n_users': n_users, 'n_items': n_items}
    total = 0
    for split in SPLIT_NAMES:
        stats[f'n_{split}'] = int(arrays[f'{split}_users'].shape[0])
        total += stats[f'n_{split}']
    stats['n_interactions'] = total
    stats['dropped_valid'] = int(arrays['dropped_valid'])
    stats['dropped_test'] = int(arrays['dropped_test'])
    stats['sparsity'] = 1.0 - total / float(n_users * n_items)
    for key in ('image_feat', 'text_feat'):
        stats[f'{key}_shape'] = tuple(arrays[key].shape) if key in arrays else None
    return stats


# --------------------------------------------------------------------------- writing


def format_inter(users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                 timestamps: np.ndarray, x_label: np.ndarray) -> str:
    """The `.inter` text: tab-separated header line (`INTER_HEADER`), then one row per
    interaction.

    Args:
      users, items, timestamps, x_label: (n,) integer arrays.
      ratings: (n,) integer ratings (written '5') or float ratings (written '5.0', '3.5').
    """
    columns = [map(str, a.tolist()) for a in (users, items, ratings, timestamps, x_label)]
    body = ''.join('\t'.join(row) + '\n' for row in zip(*columns))
    return '\t'.join(INTER_HEADER) + '\n' + body


# --------------------------------------------------------------------------- MMRec's preprocessing


def k_core(users: np.ndarray, items: np.ndarray, k: int,
           user_k: Optional[int] = None) -> np.ndarray:
    """(n,) bool mask of the rows kept by iterated k-core filtering.

    Removing a sparse item can push a user below k and vice versa, so the filter repeats until
    every remaining user has at least `user_k` rows and every remaining item at least `k`.

    Args:
      users: (n,) int user ids (any non-negative codes).
      items: (n,) int item ids.
      k: minimum rows per item (and per user unless `user_k` is given).
      user_k: minimum rows per user; default k.
    """
    user_k = k if user_k is None else user_k
    keep = np.ones(users.shape[0], dtype=bool)
    n_users, n_items = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    while keep.any():
        u_count = np.bincount(users[keep], minlength=n_users)
        i_count = np.bincount(items[keep], minlength=n_items)
        new_keep = keep & (u_count[users] >= user_k) & (i_count[items] >= k)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep
    return keep


def temporal_split(users: np.ndarray, timestamps: np.ndarray, valid_ratio: float,
                   test_ratio: float) -> np.ndarray:
    """x_label per row: each user's latest rows are test, the ones before valid, the rest train.

    For a user with n rows, n_test = max(1, round_half_up(n * test_ratio)) and n_valid likewise.

    Args:
      users: (n,) user ids, rows sorted by (user, timestamp).
      timestamps: (n,) times, only used to check the order.
      valid_ratio, test_ratio: fractions of each user's rows, at least one row each.

    Returns:
      (n,) int64 labels 0 (train) / 1 (valid) / 2 (test).
    """
    same_user = np.diff(users) == 0
    assert np.all(np.diff(users) >= 0) and np.all(np.diff(timestamps)[same_user] >= 0), \
        'rows must be sorted by (user, timestamp)'
    counts = np.bincount(users)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(users.shape[0]) - start[users]                  # position within the user
    n = counts[users]
    # Rounded like MMRec's per-user 8:1:1 split, but never below one valid and one test row.
    # floor(x + 0.5) is round-half-up (Python's round() would round 0.5 and 2.5 down).
    n_test = np.maximum(1, np.floor(n * test_ratio + 0.5)).astype(np.int64)
    n_valid = np.maximum(1, np.floor(n * valid_ratio + 0.5)).astype(np.int64)
    labels = np.zeros(users.shape[0], dtype=np.int64)
    labels[rank >= n - n_test - n_valid] = 1
    labels[rank >= n - n_test] = 2
    return labels
