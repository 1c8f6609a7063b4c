"""Vmapped sweeps: grid points that differ only in numeric hyper-parameters train side by side.

Points whose configs agree on everything that fixes shapes and code (layers, sizes, batch
size, kNN k, dropout, ...) and differ only in VMAPPED_FIELDS form a group. A group trains in
one compiled program: `jax.vmap` over a leading axis of the parameters, optimiser state and
training state, with per-point learning rate, reg weight and PWC weights as arrays, per-point
batches (each point's seed draws its own), and per-point item-graph values (mm_image_weight
changes the kNN graph's values, never its entries, for weights strictly between 0 and 1). The
frozen features are shared, so each tower's product over all items becomes one wider matmul
for all points. Each point keeps its own host state (PWC schedule, early stopping, history),
its own checkpoints, metrics.jsonl and result.json, in exactly the format of a point trained
alone, so a vmapped run can be resumed sequentially and vice versa.

A point that stops early (or diverges) stops updating (a per-point `active` mask) while the
others go on; when at most half of a group is still active, the group is compacted to its
active points (one recompilation) so finished points cost nothing.

Per-point results equal training the point alone up to float32 rounding (tested).
"""
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import graph, optim, parallel, sampling, train
from lirdrec_jax.models import lirdrec

VMAPPED_FIELDS = ('optim.learning_rate', 'optim.lr_decay_factor', 'optim.lr_decay_epochs',
                  'model.reg_weight', 'model.decay_weight', 'model.decay_base',
                  'model.mm_image_weight', 'train.seed', 'train.epochs', 'train.stopping_step')
SWEEP_MODES = ('sequential', 'vmapped')


def static_signature(cfg) -> str:
    """What must agree for points to share one compiled program: the config without the
    vmapped fields (and without the point-independent run settings)."""
    d = cfg.to_dict()
    for dotted in VMAPPED_FIELDS:
        section, name = dotted.split('.')
        d.get(section, {}).pop(name, None)
    for key in ('checkpoint', 'resume', 'hyper_parameters', 'sweep', 'parallel', 'data'):
        d.pop(key, None)
    # The kNN graph's entries are the union of both modalities' neighbours for weights strictly
    # between 0 and 1; a weight of 0 or 1 drops one modality's entries (other shapes).
    w = float(cfg.model.mm_image_weight)
    d['knn_entries'] = 'text' if w == 0.0 else 'image' if w == 1.0 else 'both'
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


# ----------------------------------------------------------------------------------------------
# Stacking per-point pytrees
# ----------------------------------------------------------------------------------------------

def _same(leaves) -> bool:
    first = leaves[0]
    return all(x is first for x in leaves) or all(
        np.shape(x) == np.shape(first) and np.array_equal(np.asarray(x), np.asarray(first))
        for x in leaves[1:])


def stack_or_share(trees: Sequence):
    """One pytree from per-point pytrees of the same structure: leaves equal in every point are
    shared (vmap axis None), the others stacked on a new leading axis (vmap axis 0).

    Returns:
      (tree, axes): the tree and a matching pytree of vmap in_axes.
    """
    leaves, treedef = zip(*(jax.tree.flatten(t) for t in trees))
    merged, axes = [], []
    for per_point in zip(*leaves):
        if _same(per_point):
            merged.append(per_point[0])
            axes.append(None)
        else:
            merged.append(jnp.stack([jnp.asarray(x) for x in per_point]))
            axes.append(0)
    return treedef[0].unflatten(merged), treedef[0].unflatten(axes)


def take(tree, index, axes=None):
    """The points `index` (an int or an index array) of a stacked tree; shared leaves kept."""
    if axes is None:
        return jax.tree.map(lambda x: x[index], tree)
    return jax.tree.map(lambda x, a: x if a is None else x[index], tree, axes,
                        is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------------------------
# Compiled pieces
# ----------------------------------------------------------------------------------------------

def make_vmapped_step(model, optimizer, partitioner: parallel.Partitioner, graph_axes,
                      compiler_options: Optional[dict] = None):
    """`step(states, batches, features, graphs, scalars, active) -> (states, (P,) losses)`: one
    train step of every point; points with active False keep their state unchanged."""
    step = train.train_step_fn(model, optimizer)

    def masked(state, batch, features, graphs, scalars, active):
        new, loss = step(state, batch, features, graphs, scalars)
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), loss

    vmapped = jax.vmap(masked, in_axes=(0, 0, None, graph_axes, 0, 0))
    return partitioner.jit(vmapped, donate_argnums=0, compiler_options=compiler_options)


def make_vmapped_forward(model, partitioner: parallel.Partitioner, graph_axes):
    def forward(params, features, graphs, w1, w2):
        return model.apply({'params': params}, features, graphs, w1, w2)
    return partitioner.jit(jax.vmap(forward, in_axes=(0, None, graph_axes, 0, 0)))


def _sweep_operand(adj, options: train.RunOptions):
    # Vmapping needs the ChunkedCoo form (values may be stacked, indices shared); with 'bcoo'
    # one chunk is used, which is the same arithmetic as the BCOO product.
    chunk = options.spmm_chunk_size if options.spmm_impl == 'segment_sum' else 0
    return graph.to_chunked(adj, chunk)


# ----------------------------------------------------------------------------------------------
# One group
# ----------------------------------------------------------------------------------------------

class _Point:
    """Host-side state of one point of a group."""

    def __init__(self, cfg, workdir: Path, label: str, primary: bool):
        self.cfg, self.label = cfg, label
        m = cfg.model
        self.key = jax.random.PRNGKey(int(cfg.train.seed))
        self.init_key, self.dropout_key = jax.random.split(self.key)
        self.progress = train.Progress(epochs_done=0, w1=float(m.decay_weight),
                                       w2=1.0 - float(m.decay_weight))
        self.files = train.PointFiles(workdir, int(cfg.checkpoint.keep_last), primary,
                                      label=f'[{label}] ' if label else '')
        self.diverged: Optional[str] = None
        self.schedule = None

    @property
    def active(self) -> bool:
        p = self.progress
        return (self.diverged is None and not p.stopped_early
                and p.epochs_done < int(self.cfg.train.epochs))

    def result(self) -> dict:
        if self.diverged is not None:
            return {'finished': True, 'diverged': self.diverged, 'best_epoch': -1,
                    'best_valid': None, 'best_test': None, 'history': []}
        return train.point_result(self.progress, self.cfg.train.epochs)


def train_group(cfgs: Sequence, data: train.PreparedData, workdirs: Sequence[Path], *,
                resume: bool = False, stop_after_epochs: Optional[int] = None,
                partitioner: Optional[parallel.Partitioner] = None,
                labels: Optional[Sequence[str]] = None) -> List[dict]:
    """Train the points `cfgs` (one `group_points` group) side by side; one result dict per
    point, as `train.train_and_evaluate` returns it (a diverged point: 'diverged' names the
    epoch and batch, as experiment.py reports it).

    Args:
      cfgs: the points' configs; they must share `static_signature`.
      data: shared dataset-derived inputs.
      workdirs: one directory per point (checkpoints, metrics.jsonl).
      resume: continue each point from its latest checkpoint if it has one.
      stop_after_epochs: stop (as if interrupted) after this many epochs of this call.
      partitioner: the devices; by default built from the first config's `parallel` section.
      labels: prefixes for each point's progress lines.
    """
    if len({static_signature(c) for c in cfgs}) != 1:
        raise ValueError('the points of a vmapped group must agree on every field outside '
                         f'{VMAPPED_FIELDS}')
    ds = data.dataset
    c0 = cfgs[0]
    for c in cfgs:
        train.check_point_config(c, ds.n_items)
    partitioner = partitioner or train.create_partitioner(c0.get('parallel'))
    options = train.run_options(c0)
    labels = labels or [''] * len(cfgs)
    points = [_Point(c, Path(w), l, partitioner.is_primary)
              for c, w, l in zip(cfgs, workdirs, labels)]
    model = train.create_model(c0.model, ds.n_users, ds.n_items, partitioner)
    optimizer = optim.create_optimizer(float(c0.optim.weight_decay))
    features = train.place_features(partitioner, data.features, options)
    user_item = _sweep_operand(data.norm_adj, options)
    item_graphs = [_sweep_operand(train.create_item_graph(data, int(c.model.knn_k),
                                                          float(c.model.mm_image_weight)),
                                  options) for c in cfgs]
    if not _same([g.rows for g in item_graphs]) or not _same([g.cols for g in item_graphs]):
        # `static_signature` keeps weights 0 and 1 apart; this guards other feature layouts.
        raise ValueError('the kNN item graphs of this group have different entries; use '
                         '--config.sweep.mode=sequential')

    # Per-point initial (or restored) states, stacked.
    graphs_one = lirdrec.Graphs(user_item, item_graphs[0])
    states = []
    for p in points:
        state = train.create_train_state(p.init_key, model, optimizer, features,
                                         partitioner.replicate(graphs_one))
        state = train.place_state(partitioner, state)
        if resume and p.files.checkpoints.latest_epoch() is not None:
            saved, saved_progress = p.files.checkpoints.restore(
                train._state_to_save(state, p.key, partitioner))
            state = state._replace(params=saved['params'], opt_state=saved['opt_state'],
                                   attention=saved['attention'])
            p.progress = train.Progress(**saved_progress)
            p.files.log(f'resumed from {p.files.checkpoints.directory} after epoch '
                        f'{p.progress.epochs_done - 1}')
        states.append(state)
    slots = [i for i, p in enumerate(points) if p.active]  # points still in the stacked state
    if slots:
        state = partitioner.replicate(jax.tree.map(lambda *xs: jnp.stack(xs),
                                                   *[states[i] for i in slots]))
        del states
        _run_rounds(points, slots, state, model, optimizer, features, user_item, item_graphs,
                    data, options, partitioner, stop_after_epochs)
    for p in points:
        p.files.close()
    return [p.result() for p in points]


def _run_rounds(points, slots, state, model, optimizer, features, user_item, item_graphs,
                data, options, partitioner, stop_after_epochs) -> None:
    """Epoch rounds: every active point advances one epoch per round."""
    c0 = points[0].cfg
    dropout, e = float(c0.model.dropout), c0.eval
    compiled = {}  # per tuple of slots: (step, forward, item graph)

    def build(slot_ids):
        ii, ii_axes = stack_or_share([item_graphs[i] for i in slot_ids])
        # The user-item graph is shared, or (edge dropout) one sample per point.
        axes = lirdrec.Graphs(0 if dropout > 0 else None, ii_axes)
        step = make_vmapped_step(model, optimizer, partitioner, axes, options.compiler_options)
        forward = (make_vmapped_forward(model, partitioner, axes)
                   if e.embeddings == 'fresh' else None)
        return step, forward, partitioner.replicate(ii)

    rounds = 0
    ui_shared = partitioner.replicate(user_item)
    while slots:
        if stop_after_epochs is not None and rounds >= stop_after_epochs:
            break
        if tuple(slots) not in compiled:
            compiled[tuple(slots)] = build(slots)
        step, forward, item_item = compiled[tuple(slots)]
        t0 = time.perf_counter()
        active = np.array([points[i].active for i in slots])
        scalars, batches, ui_graphs = [], [], []
        for i in slots:
            p = points[i]
            epoch = p.progress.epochs_done
            p.schedule = train.epoch_schedule(p.progress, p.cfg.model, p.cfg.optim, epoch)
            scalars.append((*p.schedule, float(p.cfg.model.reg_weight)))
            batches.append(sampling.epoch_batches(sampling.epoch_rng(int(p.cfg.train.seed), epoch),
                                                  data.sampler, int(p.cfg.train.batch_size)))
            if dropout > 0:
                ui_graphs.append(_sweep_operand(train.epoch_graphs(
                    data, None, dropout, jax.random.fold_in(p.dropout_key, epoch),
                    data.dataset.n_users, data.dataset.n_items).user_item, options))
        # Start of epoch for every active point: theta <- the last attention.
        keep = partitioner.replicate(jnp.asarray(active))
        theta = jnp.where(keep[:, None, None], state.attention,
                          state.params['fusion']['theta'])
        state = state._replace(params=train.with_theta(state.params, theta))
        scalars = partitioner.replicate(train.StepScalars(
            *(jnp.asarray(np.array(col, np.float64), jnp.float32) for col in zip(*scalars))))
        stacked = sampling.EpochBatches(*(np.stack(a) for a in zip(*batches)))
        on_device = train.Batch(*(partitioner.split(a, axis=2) for a in stacked))
        ui = (partitioner.replicate(jax.tree.map(lambda *xs: jnp.stack(xs), *ui_graphs))
              if dropout > 0 else ui_shared)
        graphs = lirdrec.Graphs(ui, item_item)
        step_losses = []
        for b in range(stacked.users.shape[1]):
            state, loss = step(state, train.Batch(*(a[:, b] for a in on_device)), features,
                               graphs, scalars, keep)
            step_losses.append(loss)
        step_losses = partitioner.to_host(jnp.stack(step_losses))  # (n_batches, P)
        train_seconds = time.perf_counter() - t0
        fresh = (forward(state.params, features, graphs, scalars.w1, scalars.w2)
                 if forward is not None else None)
        for slot, i in enumerate(slots):
            p = points[i]
            if not p.active:
                continue
            _end_point_epoch(p, slot, state, fresh, step_losses[:, slot], train_seconds, data,
                             partitioner)
        rounds += 1
        still = [slot for slot, i in enumerate(slots) if points[i].active]
        if not still:
            slots = []
        elif len(still) <= len(slots) // 2:
            # Compact: drop finished points from the stacked state (one recompilation).
            state = partitioner.replicate(take(state, np.array(still)))
            slots = [slots[slot] for slot in still]


def _end_point_epoch(p: _Point, slot: int, state, fresh, losses: np.ndarray,
                     train_seconds: float, data, partitioner) -> None:
    """One point's bookkeeping after a round: loss, evaluation, early stopping, files."""
    cfg, epoch = p.cfg, p.progress.epochs_done
    try:
        loss = train.summed_loss(losses, epoch)
    except train.TrainingDiverged as err:
        p.diverged = str(err)
        p.files.log(f'diverged: {err}')
        return
    point_state = take(state, slot)

    def evaluate():
        if fresh is None:
            user_emb, item_emb = point_state.user_emb, point_state.item_emb
        else:
            user_emb, item_emb = fresh[0][slot], fresh[1][slot]
        return train.evaluate_splits(user_emb, item_emb, data, cfg.eval, partitioner)

    record, improved = train.record_epoch(p.progress, cfg, epoch, p.schedule, loss,
                                          train_seconds, evaluate, p.files)
    p.files.end_epoch(p.progress, record, train._state_to_save(point_state, p.key, partitioner),
                      improved)
    train.log_stop(p.progress, cfg, p.files)
