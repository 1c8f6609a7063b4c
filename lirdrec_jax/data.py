"""Loading and validating MMRec-layout datasets (interface; implementation in progress)."""
from typing import NamedTuple, Optional

import numpy as np


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file, line/field and expectation."""


class Interactions(NamedTuple):
    """One split of user-item interactions, in the order of the `.inter` file.

    Attributes:
      users: (n,) int32 user ids in [0, n_users).
      items: (n,) int32 item ids in [0, n_items).
    """
    users: np.ndarray
    items: np.ndarray


class MMRecDataset(NamedTuple):
    """A dataset in memory, as training reads it.

    Attributes:
      name: dataset name (the `.inter` file stem).
      n_users: max user id over all rows of the `.inter` file + 1 (the reference's count).
      n_items: max item id over all rows + 1.
      train: x_label == 0 rows.
      valid: x_label == 1 rows whose user appears in train (the reference drops the others).
      test: x_label == 2 rows whose user appears in train.
      image_feat: (n_items, d_v) float32 or None when `image_feat.npy` is absent.
      text_feat: (n_items, d_t) float32 or None when `text_feat.npy` is absent.
    """
    name: str
    n_users: int
    n_items: int
    train: Interactions
    valid: Interactions
    test: Interactions
    image_feat: Optional[np.ndarray]
    text_feat: Optional[np.ndarray]
