"""Hyper-parameter grids: the product of the values of the fields named in `hyper_parameters`.

Like the reference, a field listed in `config.hyper_parameters` may hold a tuple of values and
the run covers their Cartesian product, in the listed order (the last key varies fastest).
Every other field of the `model`, `optim` and `train` sections must hold one value.
"""
import itertools
from typing import NamedTuple

import ml_collections

GRID_SECTIONS = ('model', 'optim', 'train')


class GridPoint(NamedTuple):
    """One point: its index, the values of the swept keys, and a config with scalars only."""
    index: int
    values: dict
    config: ml_collections.ConfigDict


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f'hyper_parameters names {dotted!r}, which is not a config field '
                           f'(fields look like "model.reg_weight" or "train.seed")')
        node = node[part]
    return node


def _as_values(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def expand_grid(config: ml_collections.ConfigDict) -> list:
    """All grid points of `config`, each with a config whose swept fields hold one value."""
    keys = list(config.hyper_parameters)
    for section in GRID_SECTIONS:
        for name, value in config[section].items():
            dotted = f'{section}.{name}'
            if isinstance(value, (tuple, list)) and dotted not in keys and len(value) != 1:
                raise ValueError(f'config field {dotted} holds several values {tuple(value)} but '
                                 f'is not listed in hyper_parameters {tuple(keys)}')
    value_lists = [_as_values(_lookup(config, k)) for k in keys]
    for k, values in zip(keys, value_lists):
        if not values:
            raise ValueError(f'hyper-parameter {k} has no values')
    points = []
    for index, combo in enumerate(itertools.product(*value_lists)):
        point = config.to_dict()
        for section in GRID_SECTIONS:  # single-value tuples become scalars
            for name, value in point[section].items():
                if isinstance(value, (tuple, list)):
                    point[section][name] = value[0]
        for k, v in zip(keys, combo):
            section, name = k.split('.', 1)
            point[section][name] = v
        points.append(GridPoint(index, dict(zip(keys, combo)),
                                ml_collections.ConfigDict(point)))
    return points


def seed_variants(point_config: ml_collections.ConfigDict, n_points: int) -> list:
    """`n_points` copies of a point config that differ only in `train.seed` (seed, seed + 1,
    ...): points that share one compiled program, as a vmapped sweep trains them."""
    out = []
    for i in range(n_points):
        c = point_config.copy_and_resolve_references()
        c.train.seed = int(point_config.train.seed) + i
        out.append(c)
    return out
