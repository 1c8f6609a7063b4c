"""Reading a prepared dataset folder (MMRec layout) for the commands that add input files to it
(`data_prep.mllmrec`, `data_prep.words`): its interactions parsed and checked by the same code
training runs (`lirdrec_jax.mmrec_files`), so the counts and ids match what the model sees."""
from pathlib import Path
from typing import Dict, List, NamedTuple

import numpy as np

from data_prep import features
from lirdrec_jax import mmrec_files


class Dataset(NamedTuple):
    """What the commands need of the dataset folder.

    Attributes:
      folder: `<data_dir>/<dataset>`.
      name: the dataset name.
      n_users, n_items: the counts training uses (max id + 1 over all rows).
      train_users, train_items: (n,) int32 ids of the x_label 0 rows, in file order.
    """
    folder: Path
    name: str
    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray


def read_dataset(data_dir: str, name: str) -> Dataset:
    """Reads and checks the `.inter` file (the same parsing training runs)."""
    folder = Path(data_dir) / name
    inter = mmrec_files.check_layout(folder, name)
    splits = mmrec_files.split_interactions(mmrec_files.read_inter(inter), inter)
    return Dataset(folder, name, splits.n_users, splits.n_items, splits.arrays['train_users'],
                   splits.arrays['train_items'])


class RawIds(NamedTuple):
    """The raw id of each mapped id 0..n-1 (from the folder's id map, or the mapped id as a
    string when there is none) and the reverse lookup.

    Attributes:
      raw: raw id of each mapped id.
      index: raw id -> mapped id.
      from_map: whether `raw` was read from the map.
    """
    raw: List[str]
    index: Dict[str, int]
    from_map: bool


def read_raw_ids(path: Path, n: int, id_column: str, required: bool = False) -> RawIds:
    """The raw ids of `path` (an i_id_mapping.csv / u_id_mapping.csv, `features.read_id_map`
    with its mapped-id column `id_column`), or the mapped ids when it is absent and not
    `required` (a map given explicitly must exist)."""
    if path.is_file() or required:
        raw, from_map = features.read_id_map(path, n, id_column), True
    else:
        raw, from_map = [str(i) for i in range(n)], False
    return RawIds(raw, {k: i for i, k in enumerate(raw)}, from_map)
