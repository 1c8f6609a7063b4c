"""Vmapped sweeps: grid points that differ only in numeric hyper-parameters train side by side.

Points whose configs agree on everything that fixes shapes and code (layers, sizes, batch
size, kNN k, dropout, ...) and differ only in the fields a vmapped sweep may vary (the
optimiser's and trainer's `VMAPPED_FIELDS` plus the model's own `sweep_fields`) form a group.
A group trains in one compiled program: the trainer's own epoch code (`train.train_points`)
`jax.vmap`ped over a leading axis of the parameters, optimiser state and carried state, with
per-point scalars (learning rate, the model's epoch scalars), per-point batches (each point's
seed draws its own) and per-point input values (e.g. a kNN graph whose values depend on a
mixing weight). Inputs equal in every point (the frozen features) are shared, so a product
over all items becomes one wider matmul for all points. Each point keeps its own host state,
checkpoints, metrics.jsonl and result.json, in exactly the format of a point trained alone,
so a vmapped run can be resumed sequentially and vice versa.

A point that stops early (or diverges) stops updating while the others go on; when at most
half of a group is still active, the group is compacted to its active points (one
recompilation) so finished points cost nothing.

Per-point results equal training the point alone up to float32 rounding (tested).
"""
import json
from pathlib import Path
from typing import List, Optional, Sequence

from lirdrec_jax import models, parallel, train

# Fields of the generic sections that a vmapped sweep may vary (the model adds its own).
VMAPPED_FIELDS = ('optim.learning_rate', 'optim.lr_decay_factor', 'optim.lr_decay_epochs',
                  'train.seed', 'train.epochs', 'train.stopping_step')
SWEEP_MODES = ('sequential', 'vmapped')

# Re-exported for the callers that stack per-point trees.
stack_or_share, take = train.stack_or_share, train.take


def vmapped_fields(cfg) -> tuple:
    """Every field that may differ between the points of one group."""
    return VMAPPED_FIELDS + tuple(models.get_model(cfg.model_name).sweep_fields)


def static_signature(cfg) -> str:
    """What must agree for points to share one compiled program: the config without the
    vmapped fields (and without the point-independent run settings), plus the model's
    `static_key`."""
    d = cfg.to_dict()
    for dotted in vmapped_fields(cfg):
        section, name = dotted.split('.')
        d.get(section, {}).pop(name, None)
    for key in ('checkpoint', 'resume', 'hyper_parameters', 'sweep', 'parallel', 'data'):
        d.pop(key, None)
    d['model_static_key'] = models.get_model(cfg.model_name).static_key(cfg.model)
    return json.dumps(d, sort_keys=True, default=str)


def group_points(points: Sequence, max_points: int = 0) -> List[list]:
    """Points grouped by `static_signature`, groups in order of their first point; groups are
    cut into pieces of at most `max_points` (0: no limit)."""
    groups = {}
    for point in points:
        groups.setdefault(static_signature(point.config), []).append(point)
    out = []
    for members in groups.values():
        size = max_points if max_points > 0 else len(members)
        out += [members[i:i + size] for i in range(0, len(members), size)]
    return out


def check_sweep_config(sweep_cfg) -> None:
    mode = sweep_cfg.get('mode', 'sequential')
    if mode not in SWEEP_MODES:
        raise ValueError(f'config field sweep.mode = {mode!r}; expected one of {SWEEP_MODES}')
    if int(sweep_cfg.get('max_points', 0)) < 0:
        raise ValueError(f'config field sweep.max_points = {sweep_cfg.max_points!r}; expected '
                         '>= 0 (0 = no limit)')


def train_group(cfgs: Sequence, data: train.PreparedData, workdirs: Sequence[Path], *,
                resume: bool = False, stop_after_epochs: Optional[int] = None,
                partitioner: Optional[parallel.Partitioner] = None,
                labels: Optional[Sequence[str]] = None) -> List[dict]:
    """Train the points `cfgs` (one `group_points` group) side by side; one result dict per
    point, as `train.train_points` returns it."""
    if len({static_signature(c) for c in cfgs}) != 1:
        raise ValueError('the points of a vmapped group must agree on every field outside '
                         f'{vmapped_fields(cfgs[0])}')
    return train.train_points(cfgs, data, workdirs, resume=resume,
                              stop_after_epochs=stop_after_epochs, partitioner=partitioner,
                              labels=labels)
