"""A model's extra input files: reading and checking them, and their no-LLM stand-ins.

Some models read more than MMRec's `.inter` and feature files: MLLMRec reads an item matrix
(an MLLM's image description joined with the item's metadata, text-encoded) and a user matrix
(an LLM-written profile of each user, text-encoded). A model declares such files in
`base.Model.input_files`; `read_input_files` loads each from the dataset folder, checks it
against the dataset's counts, and returns the arrays that `experiment.load_dataset` puts into
`dataset.extra`. An input file is dense (a `.npy` array, e.g. MLLMRec's matrices) or sparse (a
scipy `.npz` matrix, e.g. DGVAE's per-user word TF-IDF of `lirdrec_jax.word_view`), as its
`InputFile.kind` says.

The no-LLM stand-ins (`no_llm_item_rows`, `mean_user_rows`) are the pure builders used where no
language model was run: by the embedded default dataset (`lirdrec_jax.synthetic`), by the
benchmark's in-memory data, and as the default of `python -m data_prep.mllmrec`:
  * items: the dataset's text-feature rows, i.e. the metadata half of the reference's input,
    encoded by MMRec with the same sentence encoder (all-MiniLM-L6-v2) the reference uses, so
    similarity thresholds tuned on the reference's files keep their meaning;
  * users: the mean of the item rows over the user's TRAINING interactions (x_label 0) only.
    Valid and test interactions never enter a profile: a profile built from them hands the
    held-out answers to the model. An open report on the reference's repository
    (https://github.com/Yuzhuo-Dang/MLLMRec/issues/6) found that profiles built from every
    interaction inflate the results and that training-only profiles help little; the code
    that built the reference's profiles is not released, so its files cannot be checked. A
    user without a training interaction gets a zero row.

Every value written is computed with elementwise IEEE operations in a fixed order (float64
sums in row order, no BLAS), so the embedded files are the same bytes on every machine.

This module imports nothing of `data_prep`: the data commands import it, not the reverse.
"""
import os
import tempfile
import types
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp

from lirdrec_jax.mmrec_files import DataError, load_npy, warn

PathLike = Union[str, os.PathLike]

ROW_KINDS = ('items', 'users')
# `InputFile.kind`: a dense .npy array, or a scipy sparse matrix saved with save_npz.
INPUT_KINDS = ('dense', 'sparse')
# The file names the embedded default dataset carries its no-LLM stand-ins under (MLLMRec's
# reference names them so), with what their rows are.
NO_LLM_FILES = (('image_text_feat.npy', 'items'), ('user_preferences_feat.npy', 'users'))


# --------------------------------------------------------------------------- no-LLM builders


def no_llm_item_rows(text_feat: np.ndarray) -> np.ndarray:
    """The no-LLM item matrix: the text-feature rows themselves.

    Args:
      text_feat: (n_items, d) text features (MMRec's text_feat.npy).

    Returns:
      (n_items, d) float32, a copy.
    """
    return np.array(text_feat, dtype=np.float32, copy=True)


def mean_user_rows(item_rows: np.ndarray, train_users: np.ndarray, train_items: np.ndarray,
                   n_users: int) -> Tuple[np.ndarray, int]:
    """The no-LLM user matrix: each user's mean item row over its training interactions.

    Pass the TRAINING interactions only (x_label 0): a valid or test item must never shape the
    profile the model ranks from. A (user, item) pair listed twice counts twice, as it does in
    the reference's interaction lists.

    Args:
      item_rows: (n_items, d) item matrix.
      train_users, train_items: (n,) int ids of the training interactions.
      n_users: rows of the result.

    Returns:
      ((n_users, d) float32, number of users without a training interaction: their rows are
      zero). Sums run in float64 in the order of the interactions (bit-identical everywhere).
    """
    train_users = np.asarray(train_users, dtype=np.int64)
    train_items = np.asarray(train_items, dtype=np.int64)
    if train_users.shape != train_items.shape:
        raise ValueError(f'train_users has shape {train_users.shape} but train_items '
                         f'{train_items.shape}; expected equal lengths')
    sums = np.zeros((n_users, item_rows.shape[1]), dtype=np.float64)
    np.add.at(sums, train_users, np.asarray(item_rows, dtype=np.float64)[train_items])
    counts = np.bincount(train_users, minlength=n_users)
    rows = sums / np.maximum(counts, 1)[:, None]
    return rows.astype(np.float32), int((counts == 0).sum())


def no_llm_rows(dataset, rows: str) -> np.ndarray:
    """The no-LLM stand-in for an input file of the given row kind, from an in-memory dataset
    (the benchmark's synthetic data, which has no files): items = `no_llm_item_rows` of the
    text features, users = `mean_user_rows` of those over the training split."""
    if dataset.text_feat is None:
        raise DataError(f'dataset {dataset.name}: no text features, from which the no-LLM '
                        f'stand-in of an input file with one row per {rows[:-1]} is built')
    items = no_llm_item_rows(dataset.text_feat)
    if rows == 'items':
        return items
    return mean_user_rows(items, dataset.train.users, dataset.train.items, dataset.n_users)[0]


def word_view_rows(dataset, rows: str, item_texts: Sequence[str]):
    """The stand-in of a sparse input file from an in-memory dataset: the word view
    (`lirdrec_jax.word_view`, each user's TF-IDF over the words of its training items) built
    from `item_texts` ((n_items,) strings, e.g. the synthetic data's made-up texts)."""
    from lirdrec_jax import word_view
    if rows != 'users':
        raise DataError(f'dataset {dataset.name}: a sparse input file with one row per '
                        f'{rows[:-1]} has no stand-in; expected one row per user (a word view)')
    return word_view.build_word_view(list(item_texts), dataset.train.users,
                                     dataset.train.items, dataset.n_users).matrix


def with_no_llm_inputs(dataset, input_files: Sequence,
                       item_texts: Optional[Sequence[str]] = None) -> object:
    """`dataset` with `extra` holding the no-LLM stand-in of each declared input file: dense
    ones from the text features (`no_llm_rows`), sparse ones (DGVAE's word view) from
    `item_texts` (`word_view_rows`), which an in-memory dataset has only when its generator
    made them (`synthetic.generate_exact_counts(item_text=True)`)."""
    if not input_files:
        return dataset
    for f in input_files:
        if getattr(f, 'kind', 'dense') != 'dense' and item_texts is None:
            raise DataError(f'dataset {dataset.name}: the model reads a {f.kind} input file '
                            f'(data.{f.field}), which has no stand-in built from the in-memory '
                            f'data without item texts; expected dense input files only, or '
                            f'item texts to build it from')
    return dataset._replace(extra=as_mapping({
        f.field: (no_llm_rows(dataset, f.rows) if getattr(f, 'kind', 'dense') == 'dense'
                  else word_view_rows(dataset, f.rows, item_texts))
        for f in input_files}))


def save_npy_atomic(path: PathLike, array: np.ndarray) -> None:
    """np.save via a temp file in the same folder and os.replace: a reader never sees a
    truncated file, and two writers of the same content leave one whole copy."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.stem}-', suffix='.npy.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- reading


def _fill(build: str, data_dir: PathLike, dataset: str) -> str:
    """The build command with '{data_dir}' and '{dataset}' filled in (other braces kept)."""
    return build.replace('{data_dir}', str(data_dir)).replace('{dataset}', str(dataset))


def _check_shape(shape: Tuple[int, int], where: str, rows: str, n_rows: int,
                 build: str) -> None:
    """DataError unless a 2-D input matrix has n_rows rows and at least one column."""
    one = rows[:-1]
    if shape[0] != n_rows:
        raise DataError(f'{where}: {shape[0]} rows but the dataset has n_{rows}={n_rows}; '
                        f'expected one row per {one}, row i describing {one} i (a file built '
                        f'for another dataset? rebuild it: {build})')
    if shape[1] == 0:
        raise DataError(f'{where}: shape {shape} has no columns; expected (n_{rows}={n_rows}, d) '
                        f'with d >= 1')


def _load_npz(path: Path, where: str) -> sp.csr_matrix:
    """The scipy sparse matrix saved in `path` (no pickles), as CSR; DataError when the file is
    not one."""
    expected = 'expected a sparse matrix saved with scipy.sparse.save_npz'
    try:
        with open(path, 'rb') as f:
            magic = f.read(4)
    except OSError as e:
        raise DataError(f'{where}: cannot be read ({e}); {expected}') from e
    if magic != b'PK\x03\x04':
        # A .npz is a zip archive; anything else (a .npy, text) is reported as what it is.
        raise DataError(f'{where}: cannot be loaded as a sparse .npz matrix (the file does not '
                        f'start with the zip magic bytes PK\\x03\\x04, it starts with '
                        f'{magic!r}); {expected}')
    try:
        matrix = sp.load_npz(path)  # reads with allow_pickle=False
    except Exception as e:  # any failure means the file is not a usable sparse matrix
        raise DataError(f'{where}: cannot be loaded as a sparse .npz matrix '
                        f'({type(e).__name__}: {e}); {expected}') from e
    try:
        matrix = sp.csr_matrix(matrix)
        matrix.check_format(full_check=True)  # index bounds and a monotone indptr
    except Exception as e:
        raise DataError(f'{where}: not a valid sparse matrix ({type(e).__name__}: {e}); '
                        f'{expected}') from e
    return matrix


def validate_sparse_rows(matrix: sp.spmatrix, where: str, rows: str, n_rows: int,
                         build: str) -> sp.csr_matrix:
    """Checks one sparse input matrix and returns it as float32 CSR.

    Args:
      matrix: the loaded matrix, expected (n_rows, d).
      where: the file and its config field, for messages.
      rows: 'items' or 'users'.
      n_rows: n_items or n_users of the dataset.
      build: the (filled-in) command that rebuilds the file, for messages.

    Returns:
      (n_rows, d) float32 `scipy.sparse.csr_matrix` in canonical form (sorted indices,
      duplicate entries summed). Rows may be zero (a user without training items).
    """
    one = rows[:-1]
    matrix = sp.csr_matrix(matrix)
    dtype = matrix.dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise DataError(f'{where}: dtype {dtype}; expected a float sparse matrix of shape '
                        f'(n_{rows}={n_rows}, d)')
    _check_shape(matrix.shape, where, rows, n_rows, build)
    matrix.sum_duplicates()  # duplicates mean their sum in scipy; sorts the indices too
    with np.errstate(over='ignore', invalid='ignore'):  # overflow is reported just below
        out = matrix.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out.data))
    if bad.size:
        bad_rows = np.unique(np.searchsorted(out.indptr, bad, side='right') - 1)
        row = int(bad_rows[0])
        raise DataError(f'{where}: row {row} ({one} {row}) contains NaN or Inf (after '
                        f'conversion to float32); expected finite values '
                        f'({bad_rows.size} bad row(s))')
    if np.issubdtype(dtype, np.integer):
        warn(f'{where}: dtype {dtype} converted to float32 (expected a float matrix; the '
             f'integer values are used as they are)')
    return out


def validate_input_rows(array: np.ndarray, where: str, rows: str, n_rows: int,
                        build: str) -> np.ndarray:
    """Checks one input matrix and returns it as float32.

    Args:
      array: the loaded array, expected (n_rows, d).
      where: the file and its config field, for messages.
      rows: 'items' or 'users'.
      n_rows: n_items or n_users of the dataset.
      build: the (filled-in) command that rebuilds the file, for messages.

    Returns:
      (n_rows, d) float32. Item rows must be non-zero (item matrices feed cosine kNN graphs,
      as the feature files do); user rows may be zero (a user without training interactions).
    """
    one = rows[:-1]
    shape = f'(n_{rows}={n_rows}, d)'
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating)
                                     or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f'{where}: dtype {array.dtype}; expected a float array of shape {shape}')
    if array.ndim != 2:
        raise DataError(f'{where}: shape {array.shape} is {array.ndim}-D; expected a 2-D array '
                        f'of shape {shape}')
    _check_shape(array.shape, where, rows, n_rows, build)
    with np.errstate(over='ignore', invalid='ignore'):  # overflow is reported just below
        out = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f'{where}: row {row} ({one} {row}) contains NaN or Inf (after '
                        f'conversion to float32); expected finite values '
                        f'({int((~finite).sum())} bad row(s))')
    if rows == 'items':
        zero = ~out.any(axis=1)
        if zero.any():
            row = int(np.flatnonzero(zero)[0])
            raise DataError(f'{where}: row {row} (item {row}) is all zeros; expected a non-zero '
                            f'vector for every item, since item similarity divides by the row '
                            f'norm ({int(zero.sum())} zero row(s))')
    if np.issubdtype(array.dtype, np.integer):
        warn(f'{where}: dtype {array.dtype} converted to float32 (expected a float array; the '
             f'integer values are used as they are)')
    return out


def read_input_file(input_file, data_cfg, dataset_dir: PathLike, n_users: int, n_items: int,
                    build: str) -> np.ndarray:
    """Reads and checks one declared input file of the dataset folder.

    Args:
      input_file: the `base.InputFile`.
      data_cfg: the config's `data` section (holds the file name in `input_file.field`).
      dataset_dir: `<data_dir>/<dataset>`.
      n_users, n_items: the dataset's counts.
      build: the command that builds the file, with data_dir and dataset filled in.

    Returns:
      (n_users or n_items, d) float32: an ndarray for a dense input file, a
      `scipy.sparse.csr_matrix` for a sparse one (`InputFile.kind`).
    """
    field, rows = input_file.field, input_file.rows
    kind = getattr(input_file, 'kind', 'dense')
    if rows not in ROW_KINDS:
        raise ValueError(f'input file data.{field}: rows={rows!r}; expected one of {ROW_KINDS}')
    if kind not in INPUT_KINDS:
        raise ValueError(f'input file data.{field}: kind={kind!r}; expected one of '
                         f'{INPUT_KINDS}')
    name = data_cfg.get(field) if hasattr(data_cfg, 'get') else getattr(data_cfg, field, None)
    if not isinstance(name, str) or not name:
        raise DataError(f'config field data.{field} is {name!r}; the model reads a file with '
                        f'one row per {rows[:-1]} named there (expected a file name inside '
                        f'{dataset_dir}, e.g. --config.data.{field}=FILE.npy)')
    path = Path(dataset_dir) / name
    where = f'{path} (data.{field})'
    if not path.is_file():
        what = 'a sparse matrix, ' if kind == 'sparse' else ''
        raise DataError(f'{path} does not exist: the model reads it as data.{field} ({what}one '
                        f'row per {rows[:-1]}); build it with: {build}')
    n_rows = n_users if rows == 'users' else n_items
    if kind == 'sparse':
        return validate_sparse_rows(_load_npz(path, where), where, rows, n_rows, build)
    array = load_npy(path, where)
    return validate_input_rows(array, where, rows, n_rows, build)


def read_input_files(input_files: Sequence, data_cfg, data_dir: PathLike, name: str,
                     n_users: int, n_items: int
                     ) -> Dict[str, Union[np.ndarray, sp.csr_matrix]]:
    """{field: array or CSR matrix} of every declared input file of `<data_dir>/<name>/` (see
    `read_input_file`); {} when none are declared."""
    dataset_dir = Path(data_dir) / name
    return {f.field: read_input_file(f, data_cfg, dataset_dir, n_users, n_items,
                                     _fill(f.build, data_dir, name))
            for f in input_files}


# --------------------------------------------------------------------------- embedded dataset


def add_no_llm_files(dataset_dir: PathLike, text_feat: np.ndarray, train_users: np.ndarray,
                     train_items: np.ndarray, n_users: int,
                     only_missing: bool = True) -> Dict[str, str]:
    """Writes the no-LLM stand-ins under `NO_LLM_FILES` names into a dataset folder.

    Args:
      dataset_dir: the folder.
      text_feat: (n_items, d) its text features.
      train_users, train_items: its training interactions (x_label 0).
      n_users: its user count.
      only_missing: write only files that are absent (nothing else is rewritten).

    Returns:
      {file name: 'written' or 'kept'}.
    """
    dataset_dir = Path(dataset_dir)
    items = no_llm_item_rows(text_feat)
    done = {}
    for fname, rows in NO_LLM_FILES:
        path = dataset_dir / fname
        if only_missing and path.is_file():
            done[fname] = 'kept'
            continue
        array = items if rows == 'items' else mean_user_rows(items, train_users, train_items,
                                                             n_users)[0]
        save_npy_atomic(path, array)
        done[fname] = 'written'
    return done


def missing_no_llm_files(dataset_dir: PathLike) -> Tuple[str, ...]:
    """The `NO_LLM_FILES` names absent from a dataset folder."""
    return tuple(f for f, _ in NO_LLM_FILES if not (Path(dataset_dir) / f).is_file())


def as_mapping(extra: Optional[Mapping[str, np.ndarray]]) -> Mapping[str, np.ndarray]:
    """`extra` as a read-only mapping (an empty one for None)."""
    return types.MappingProxyType(dict(extra or {}))
