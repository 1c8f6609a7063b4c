"""Training of grid points: epochs, evaluation, early stopping, resume, for every model.

The model is chosen by `config.model_name` from the registry (`lirdrec_jax.models`) and seen
only through its interface (`models/base.py`): the trainer draws batches of the model's kind,
calls its epoch schedule and per-epoch inputs on the host, its `start_epoch` and `loss` on the
device, and evaluates on its `eval_embeddings`. The device state is `TrainState(params,
opt_state, carry)`; the host state is `Progress` (epoch, early stopping, history, and the
model's own host state).

One loop trains a group of points (`train_points`): a group of one is a plain run; a group of
several (sweep.py decides which points may share one compiled program) runs the same epoch
code `jax.vmap`ped over a leading point axis, with a per-point `active` mask so that a point
that stopped keeps its state while the others go on. Each point keeps its own host state,
checkpoints, metrics.jsonl and result in the same format either way.

Where arrays live is the business of a `parallel.Partitioner` (all local devices by default;
one device gives the same computation as plain `jit`). The speed options of a run
(`RunOptions`: sparse product, scanned epochs, CPU GEMM kernels) are read from the config once.
"""
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lirdrec_jax import (curves, evaluation, graph, models, optim, parallel, progress, reporting,
                         sampling)
from lirdrec_jax.rundir import TEST_USERS_CANDIDATE, TEST_USERS_FILE
from lirdrec_jax.checkpointing import RunCheckpoints
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import base


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the message names the epoch and batch."""


class TrainState(NamedTuple):
    """Device-side state, passed into and returned by the train step.

    Attributes:
      params: the model's parameter pytree.
      opt_state: Adam's moments and step count.
      carry: what the model hands from one step to the next (`models/base.py`).
    """
    params: Any
    opt_state: Any
    carry: Any


@dataclasses.dataclass
class Progress:
    """Host-side training state, saved as JSON in every checkpoint."""
    epochs_done: int
    model_state: dict
    best_valid_score: float = -1.0
    stale_evaluations: int = 0
    best_epoch: int = -1
    best_valid: Optional[dict] = None
    best_test: Optional[dict] = None
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)


class PreparedData(NamedTuple):
    """Everything derived once from a dataset and shared by all grid points of one model."""
    dataset: MMRecDataset
    model_name: str
    model: Any  # the model's `prepare(dataset)`
    sampler: Any  # the tables of the model's batch kind (`sampling.BATCH_KINDS`)
    valid: evaluation.EvalSplit
    test: evaluation.EvalSplit
    ranking: evaluation.SharedRanking  # one ranking of valid's and test's users for both


def prepare_data(dataset: MMRecDataset, model_name: str) -> PreparedData:
    train = dataset.train
    model = models.get_model(model_name)
    return PreparedData(
        dataset=dataset, model_name=model_name, model=model.prepare(dataset),
        sampler=sampling.batch_kind(model.batch_kind).tables(dataset),
        valid=evaluation.build_eval_split(dataset.valid.users, dataset.valid.items,
                                          train.users, train.items),
        test=evaluation.build_eval_split(dataset.test.users, dataset.test.items,
                                         train.users, train.items),
        ranking=evaluation.build_shared_ranking(
            (dataset.valid.users, dataset.test.users), (dataset.valid.items, dataset.test.items),
            train.users, train.items))


# ----------------------------------------------------------------------------------------------
# Speed options and checks
# ----------------------------------------------------------------------------------------------

class RunOptions(NamedTuple):
    """How a point is computed (not what): the defaults give exactly the numbers of plain
    single-device training; the others the same numbers up to float32 rounding
    (docs/performance.md). Model-specific speed options (a tower's matmul dtype) are the
    model's own config fields.

    Attributes:
      spmm_impl: 'bcoo' or 'segment_sum' (graph.SPMM_IMPLS).
      spmm_chunk_size: entries per chunk of 'segment_sum' (0 = one chunk).
      scan_epoch: run an epoch's batches in one compiled `lax.scan` (bit-identical to one
        dispatch per batch on every run we compared, and faster; no progress lines within an
        epoch).
      cpu_dot: 'xla' or 'eigen': which GEMM kernels XLA:CPU uses in the training computations
        (`parallel.compiler_options`); off the CPU it is 'xla' (`for_platform`).
    """
    spmm_impl: str = 'bcoo'
    spmm_chunk_size: int = 0
    scan_epoch: bool = True
    cpu_dot: str = 'xla'

    @property
    def compiler_options(self) -> Optional[dict]:
        """XLA options of the training step/epoch (None: XLA's defaults)."""
        return parallel.compiler_options(self.cpu_dot)

    def for_vmap(self) -> 'RunOptions':
        """Vmapping needs the ChunkedCoo form of the graphs (values may be stacked per point,
        indices shared); with 'bcoo' one chunk is used, the same arithmetic as BCOO's."""
        chunk = self.spmm_chunk_size if self.spmm_impl == 'segment_sum' else 0
        return self._replace(spmm_impl='segment_sum', spmm_chunk_size=chunk)


# CPU: chunks of this many entries keep the sparse product's intermediates in cache.
CPU_SPMM_CHUNK = 4096


def run_options(cfg) -> RunOptions:
    """The point's RunOptions; absent sections or fields take the defaults.
    `graph.spmm_chunk_size = -1` means CPU_SPMM_CHUNK on the CPU and one chunk on GPU/TPU."""
    g = cfg.get('graph') or {}
    chunk = int(g.get('spmm_chunk_size', -1))
    if chunk < 0:
        chunk = CPU_SPMM_CHUNK if parallel.platform() == 'cpu' else 0
    return RunOptions(spmm_impl=str(g.get('spmm_impl', 'bcoo')), spmm_chunk_size=chunk,
                      scan_epoch=bool(cfg.train.get('scan_epoch', True)),
                      cpu_dot=str(cfg.model.get('cpu_dot', 'xla')))


# Speed options that only pay on XLA:CPU (docs/performance.md), each with the value that turns
# it off: `model.cpu_dot` (every model's) and `model.transposed_features` (a model with towers
# over frozen features: transposed copies for their weight gradients). A config without the
# field is unaffected.
CPU_ONLY_FIELDS = {'model.cpu_dot': 'xla', 'model.transposed_features': False}
_noted_cpu_options = set()  # (field, value, platform) already noted in this process


def for_platform(cfg):
    """`cfg` as it runs on `parallel.platform()`: on the CPU `cfg` itself; on GPU/TPU a copy
    with every CPU-only option (`CPU_ONLY_FIELDS`) off, noted once per process in one line,
    e.g. "note: model.cpu_dot='eigen' is a CPU option; ignored on gpu". The one place that
    decides it: whatever is built from the result (compiled steps, frozen inputs, exported
    programs) does not depend on these options off the CPU."""
    platform = parallel.platform()
    if platform == 'cpu':
        return cfg
    out = cfg
    for dotted, off in CPU_ONLY_FIELDS.items():
        section, name = dotted.split('.', 1)
        value = cfg[section].get(name, off) if section in cfg else off
        if value == off:
            continue
        if out is cfg:
            out = cfg.copy_and_resolve_references()
        out[section][name] = off
        if (dotted, value, platform) not in _noted_cpu_options and jax.process_index() == 0:
            _noted_cpu_options.add((dotted, value, platform))
            reporting.log(f'note: {dotted}={value!r} is a CPU option; ignored on {platform}')
    return out


def create_partitioner(parallel_cfg) -> parallel.Partitioner:
    """The devices of a run (`parallel` config section; absent = all devices, items split)."""
    p = parallel_cfg or {}
    return parallel.Partitioner(num_devices=int(p.get('num_devices', 0)),
                                shard_items=bool(p.get('shard_items', True)))


def check_point_config(cfg, n_users: int, n_items: int) -> None:
    """Reject values that would otherwise fail late or silently (names the config field):
    the generic sections here, the `model` section by the model's own checks."""
    model = models.get_model(cfg.model_name)
    metrics = [f'{m.lower()}@{k}' for m in cfg.eval.metrics for k in cfg.eval.topk]
    g = cfg.get('graph') or {}
    checks = [
        (cfg.eval.valid_metric.lower() in metrics, 'eval.valid_metric',
         f'one of the computed metrics {metrics}'),
        (max(cfg.eval.topk) <= n_items, 'eval.topk', f'cutoffs <= n_items={n_items}'),
        (cfg.eval.get('recall_denominator', 'test_items') in evaluation.RECALL_DENOMINATORS,
         'eval.recall_denominator', f'one of {evaluation.RECALL_DENOMINATORS}'),
        (cfg.optim.learning_rate > 0, 'optim.learning_rate', '> 0'),
        (cfg.train.batch_size >= 1, 'train.batch_size', '>= 1'),
        (cfg.train.eval_step >= 1, 'train.eval_step', '>= 1'),
        (cfg.model.get('cpu_dot', 'xla') in parallel.CPU_DOTS, 'model.cpu_dot',
         f'one of {parallel.CPU_DOTS}'),
        (g.get('spmm_impl', 'bcoo') in graph.SPMM_IMPLS, 'graph.spmm_impl',
         f'one of {graph.SPMM_IMPLS}'),
        (int(g.get('spmm_chunk_size', -1)) >= -1, 'graph.spmm_chunk_size',
         '-1 (auto), 0 (one chunk) or a chunk size'),
    ] + list(model.config_checks(cfg, n_users, n_items))
    for ok, field, expected in checks:
        if not ok:
            section, name = field.split('.', 1)
            raise ValueError(f'config field {field} = {cfg[section].get(name)!r}; expected '
                             f'{expected}')


# ----------------------------------------------------------------------------------------------
# One place for the set-up of a point
# ----------------------------------------------------------------------------------------------

class PointSetup(NamedTuple):
    """Everything one grid point trains with (`setup_point`).

    Attributes:
      model: the registered model; net: its static description (`model.create`).
      optimizer: Adam without the learning rate.
      options: the run's speed options.
      frozen_host: the point's frozen inputs before placement; frozen: placed on the devices.
      state: the initial TrainState, replicated (its `jax.ShapeDtypeStruct`s when abstract).
      key: the point's PRNG key (from `train.seed`); epoch_key: the key that per-epoch inputs
        and per-step noise are folded from.
    """
    model: base.Model
    net: Any
    optimizer: optax.GradientTransformation
    options: RunOptions
    frozen_host: Any
    frozen: Any
    state: TrainState
    key: jax.Array
    epoch_key: jax.Array


def setup_point(cfg, data: PreparedData, partitioner: parallel.Partitioner,
                options: Optional[RunOptions] = None, placement=None,
                frozen_host=None, abstract: bool = False) -> PointSetup:
    """Model, optimiser, frozen inputs, placement and initial state of one point: the one place
    that train, sweep, bench, parity and lowering build a point from. `placement` (default: the
    partitioner) places the frozen inputs, `frozen_host` (default: built here) is their host
    form; a vmapped group passes both so that inputs the points share are placed once.
    `abstract`: the state's shapes, dtypes and shardings only (the model's init is traced, not
    run; what `lowering` builds programs from)."""
    ds = data.dataset
    model = models.get_model(cfg.model_name)
    cfg = for_platform(cfg)
    options = options or run_options(cfg)
    net = model.create(cfg.model, ds.n_users, ds.n_items, partitioner.layout_hook())
    optimizer = optim.create_optimizer(float(cfg.optim.weight_decay))
    key = jax.random.PRNGKey(int(cfg.train.seed))
    init_key, epoch_key = jax.random.split(key)
    if frozen_host is None:
        frozen_host = model.frozen_inputs(data.model, ds, cfg.model)
    frozen = model.place_frozen(frozen_host, placement or partitioner, options)
    if abstract:
        params, carry = jax.eval_shape(lambda k: model.init(k, net, frozen, frozen_host),
                                       init_key)
        state = partitioner.replicate_shapes(
            TrainState(params, jax.eval_shape(optimizer.init, params), carry))
    else:
        params, carry = model.init(init_key, net, frozen, frozen_host)
        state = partitioner.replicate(TrainState(params, optimizer.init(params), carry))
    return PointSetup(model, net, optimizer, options, frozen_host, frozen, state, key, epoch_key)


def place_epoch_inputs(partitioner: parallel.Partitioner, epoch_inputs, options: RunOptions):
    """Per-epoch inputs in the run's sparse representation, replicated on every device."""
    if epoch_inputs is None:
        return None
    return partitioner.replicate(graph.to_operands(epoch_inputs, options.spmm_impl,
                                                   options.spmm_chunk_size))


def place_batches(partitioner: parallel.Partitioner, batches):
    """An epoch's host batch arrays on the devices, each batch split over them along its rows
    (the last axis; zero-weight padding rows up to a multiple of the device count: the loss is
    unchanged)."""
    return type(batches)(*(partitioner.split(a, axis=a.ndim - 1) for a in batches))


def epoch_scalars(model: base.Model, cfg, host: dict, epoch: int) -> tuple:
    """(host, scalars) of `epoch` (0-based): the model's schedule and the learning rate."""
    host, scalars = model.epoch_schedule(cfg.model, host, epoch)
    o = cfg.optim
    lr = optim.learning_rate_at(epoch, float(o.learning_rate), float(o.lr_decay_factor),
                                float(o.lr_decay_epochs))
    return host, {**scalars, 'learning_rate': lr}


def device_scalars(scalars: dict) -> dict:
    return {k: jnp.float32(v) for k, v in scalars.items()}


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------

def make_loss_fn(model: base.Model, net) -> Callable:
    """`loss_fn(params, carry, batch, frozen, epoch_inputs, scalars, rng) -> (loss, carry)`."""
    def loss_fn(params, carry, batch, frozen, epoch_inputs, scalars, rng):
        return model.loss(net, params, carry, batch, frozen, epoch_inputs, scalars, rng)
    return loss_fn


def apply_gradients(optimizer, params, opt_state, grads, learning_rate) -> tuple:
    """One Adam step scaled by the epoch's learning rate. Returns (params, opt_state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state


def train_step_fn(model: base.Model, net, optimizer) -> Callable:
    """The pure `train_step(state, batch, frozen, epoch_inputs, scalars, key, index) ->
    (state, loss)`; the step's noise key is `key` folded with the batch `index`."""
    loss_fn = make_loss_fn(model, net)

    def train_step(state: TrainState, batch, frozen, epoch_inputs, scalars, key, index):
        rng = jax.random.fold_in(key, index)
        (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.carry, batch, frozen, epoch_inputs, scalars, rng)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads,
                                            scalars['learning_rate'])
        return TrainState(params, opt_state, carry), loss

    return train_step


def _masked(fn: Callable) -> Callable:
    """fn(state, *args) -> (state, aux) that keeps `state` where `active` is False."""
    def masked(state, *args_and_active):
        *args, active = args_and_active
        new, aux = fn(state, *args)
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), aux
    return masked


class EpochFns(NamedTuple):
    """The compiled pieces of a group's epoch (`make_epoch_fns`). Every function takes the
    group's `active` mask last (ignored for a single point)."""
    start_epoch: Callable    # (state, active) -> state
    step: Callable           # (state, batch, frozen, epoch_inputs, scalars, key, index, active)
    epoch: Callable          # (state, batches, frozen, epoch_inputs, scalars, key, active, first)
    eval_embeddings: Callable  # (params, carry, frozen, epoch_inputs, scalars) -> (users, items)


def make_epoch_fns(setup: PointSetup, partitioner: parallel.Partitioner, eval_mode: str,
                   axes: Optional[tuple] = None) -> EpochFns:
    """The jitted start-of-epoch, step, scanned epoch and evaluation embeddings of one point,
    or (`axes` = (frozen axes, epoch-input axes)) of a vmapped group of points whose states,
    batches, scalars and keys have a leading point axis."""
    model, net, options = setup.model, setup.net, setup.options
    step = train_step_fn(model, net, setup.optimizer)

    def start(state: TrainState) -> TrainState:
        params, carry = model.start_epoch(state.params, state.carry)
        return state._replace(params=params, carry=carry)

    if axes is None:
        point_step = lambda s, b, f, e, sc, k, i, active: step(s, b, f, e, sc, k, i)
        point_start = lambda s, active: start(s)
    else:
        frozen_axes, epoch_axes = axes
        point_step = jax.vmap(_masked(step), in_axes=(0, 0, frozen_axes, epoch_axes, 0, 0,
                                                     None, 0))
        point_start = jax.vmap(lambda s, active: _masked(lambda x: (start(x), ()))(s, active)[0])

    def epoch(state, batches, frozen, epoch_inputs, scalars, key, active, first):
        """The batches `first`, `first + 1`, ... of an epoch (all of them, or one chunk)."""
        n = jax.tree.leaves(batches)[0].shape[0]

        def body(s, xs):
            b, i = xs
            return point_step(s, b, frozen, epoch_inputs, scalars, key, i, active)

        return jax.lax.scan(body, state, (batches, first + jnp.arange(n, dtype=jnp.int32)))

    def embeddings(params, carry, frozen, epoch_inputs, scalars):
        return model.eval_embeddings(net, params, carry, frozen, epoch_inputs, scalars,
                                     eval_mode)

    copts = options.compiler_options
    return EpochFns(partitioner.jit(point_start, donate_argnums=0),
                    partitioner.jit(point_step, donate_argnums=0, compiler_options=copts),
                    partitioner.jit(epoch, donate_argnums=0, compiler_options=copts),
                    partitioner.jit(embeddings))


def summed_loss(step_losses: np.ndarray, epoch: int) -> float:
    """The epoch's summed loss; raises TrainingDiverged naming the first bad batch."""
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
        raise TrainingDiverged(f'training loss is {step_losses[bad[0]]} at epoch {epoch}, '
                               f'batch {bad[0]}')
    return float(step_losses.sum())


# An epoch scan is split into this many dispatches while a progress bar is on screen (and the
# epoch has at least SCAN_CHUNK_MIN_BATCHES batches), so that the bar can move; the chunks run
# the same compiled loop body over the same batch indices, so the results do not change.
SCAN_CHUNKS = 10
SCAN_CHUNK_MIN_BATCHES = 20


def scan_chunks(n_batches: int, split: bool) -> List[tuple]:
    """[(first, stop)] batch ranges of an epoch's scan dispatches: one, or about SCAN_CHUNKS
    of at most two lengths (each length is compiled once)."""
    if not split or n_batches < SCAN_CHUNK_MIN_BATCHES:
        return [(0, n_batches)]
    size = -(-n_batches // SCAN_CHUNKS)
    return [(a, min(a + size, n_batches)) for a in range(0, n_batches, size)]


def run_epoch(fns: EpochFns, state: TrainState, batches, frozen, epoch_inputs, scalars, key,
              active, epoch: int, partitioner: parallel.Partitioner, scan: bool,
              show_progress: bool = True) -> tuple:
    """All batches of one epoch (placed here), in compiled scans or one dispatch per batch,
    with a progress bar when one is shown (`show_progress` and `progress.bars_enabled()`; a
    benchmark passes False: one dispatch, no waits). Returns (state, (n_batches, ...) host
    losses)."""
    n_batches = jax.tree.leaves(batches)[0].shape[0]
    with progress.bar(n_batches, f'epoch {epoch}', unit='batch', shown=show_progress) as bar:
        if scan:
            losses = []
            for first, stop in scan_chunks(n_batches, not bar.disable):
                chunk = place_batches(partitioner, type(batches)(*(a[first:stop]
                                                                   for a in batches)))
                state, chunk_losses = fns.epoch(state, chunk, frozen, epoch_inputs, scalars, key,
                                                active, jnp.int32(first))
                losses.append(chunk_losses)
                if not bar.disable:
                    chunk_losses.block_until_ready()
                    bar.update(stop - first)
            return state, np.concatenate([partitioner.to_host(l) for l in losses])
        on_device = place_batches(partitioner, batches)
        step_losses = []
        for b in range(n_batches):
            batch = type(on_device)(*(a[b] for a in on_device))
            state, loss = fns.step(state, batch, frozen, epoch_inputs, scalars, key,
                                   jnp.int32(b), active)
            step_losses.append(loss)
            if not bar.disable:
                loss.block_until_ready()
                bar.update()
        return state, partitioner.to_host(jnp.stack(step_losses))


# ----------------------------------------------------------------------------------------------
# Epoch bookkeeping
# ----------------------------------------------------------------------------------------------

def early_stopping(progress: Progress, score: float, stopping_step: int) -> tuple:
    """The reference's rule: a strictly better (rounded) score resets the counter; the run stops
    when the counter exceeds `stopping_step`. Returns (improved, stop)."""
    if score > progress.best_valid_score:
        progress.best_valid_score, progress.stale_evaluations = score, 0
        return True, False
    progress.stale_evaluations += 1
    return False, progress.stale_evaluations > stopping_step


def evaluate_splits(user_emb, item_emb, data: PreparedData, e,
                    partitioner: parallel.Partitioner, per_user: bool = False) -> tuple:
    """(valid, test) metric dicts of one pair of embeddings (one shared ranking of their
    users: both splits mask the same training items, see `evaluation.SharedRanking`), scored
    by the model's own `score` when it has one, else by the dot product. With `per_user`,
    (valid, test, test users): the last is `test_users_arrays` of the test split."""
    ks, metrics = tuple(e.topk), tuple(m_.lower() for m_ in e.metrics)
    outcomes = evaluation.evaluate_shared(
        user_emb, item_emb, data.ranking, (data.valid, data.test), metrics=metrics, ks=ks,
        batch_size=int(e.batch_size), partitioner=partitioner,
        score=models.get_model(data.model_name).score,
        recall_denominator=str(e.get('recall_denominator', 'test_items')), per_user=True)
    (valid, _), (test, test_users) = outcomes
    if not per_user:
        return valid, test
    return valid, test, test_users_arrays(data.test.users, test_users)


def test_users_arrays(users: np.ndarray, per_user: dict) -> dict:
    """What `test_users.npz` holds: 'users' (int64 ids, ascending) and each metric's per-user
    values in that order."""
    order = np.argsort(users, kind='stable')
    return {'users': np.asarray(users, np.int64)[order],
            **{key: np.asarray(values, np.float64)[order] for key, values in per_user.items()}}


class PointFiles:
    """The outputs of one grid point: checkpoints, metrics.jsonl, progress lines. In a
    multi-process run only the primary process writes files and logs (all of them take part in
    saving checkpoints, which orbax coordinates)."""

    def __init__(self, workdir: Path, keep_last: int, primary: bool = True, label: str = '',
                 tensorboard: bool = True):
        self.workdir, self.primary, self.label = Path(workdir), primary, label
        self.checkpoints = RunCheckpoints(self.workdir / 'ckpt', keep_last)
        self.curves = curves.PointCurves(self.workdir, enabled=primary and tensorboard)

    def log(self, message: str) -> None:
        if self.primary:
            reporting.log(self.label + message)

    def end_epoch(self, progress: Progress, record: dict, saved_state: dict,
                  improved: bool) -> None:
        """The checkpoint first, then the metrics line: a run killed in between has the epoch
        in its checkpoint (whose history `restart_metrics` writes back on resume), never a
        line without a checkpoint."""
        progress.history.append(record)
        self.checkpoints.save(progress.epochs_done, saved_state, dataclasses.asdict(progress),
                              improved)
        if self.primary:
            reporting.append_json_line(self.workdir / 'metrics.jsonl', record)
            self.curves.write(record)

    def save_best_test_users(self, epoch: int, arrays: dict) -> None:
        """The per-user test metrics of a new best epoch, as a candidate beside the point's
        files; `finish_test_users` keeps the one of the final best epoch. Written before the
        epoch's checkpoint, so the best epoch of any checkpoint has its file."""
        if self.primary:
            reporting.write_npz(self.workdir / f'{TEST_USERS_CANDIDATE}{epoch:05d}.npz',
                                {'epoch': np.int64(epoch), **arrays})

    def finish_test_users(self, best_epoch: Optional[int]) -> None:
        """`test_users.npz` := the best epoch's candidate (none for a diverged point); the
        other candidates go."""
        if not self.primary:
            return
        candidate = self.workdir / f'{TEST_USERS_CANDIDATE}{best_epoch or 0:05d}.npz'
        if best_epoch is not None and candidate.exists():
            os.replace(candidate, self.workdir / TEST_USERS_FILE)
        for stale in self.workdir.glob(f'{TEST_USERS_CANDIDATE}*.npz'):
            stale.unlink()

    def restart_metrics(self, history: List[dict]) -> None:
        """metrics.jsonl := exactly the epochs of `history` (the checkpoint resumed from, or
        none for a fresh start), so that every epoch appears once however often the run was
        interrupted."""
        if self.primary:
            reporting.write_json_lines(self.workdir / 'metrics.jsonl', history)
            self.curves.restart(history)

    def close(self) -> None:
        self.checkpoints.close()
        self.curves.close()


def record_epoch(progress: Progress, cfg, epoch: int, learning_rate: float, loss: float,
                 train_seconds: float, evaluate: Callable[[], tuple], files: PointFiles) -> tuple:
    """Everything after an epoch's training: evaluation on eval epochs, early stopping, the
    progress line. The record holds the model's host state (its schedule's values). Returns
    (record, improved)."""
    t, metric = cfg.train, cfg.eval.valid_metric.lower()
    progress.epochs_done = epoch + 1
    record = {'epoch': epoch, 'loss': loss, 'learning_rate': learning_rate,
              **progress.model_state, 'train_seconds': train_seconds}
    improved = False
    if (epoch + 1) % int(t.eval_step) == 0:
        t1 = time.perf_counter()
        valid, test, test_users = evaluate()
        eval_seconds = time.perf_counter() - t1
        improved, stop = early_stopping(progress, valid[metric], int(t.stopping_step))
        if improved:
            progress.best_epoch, progress.best_valid, progress.best_test = epoch, valid, test
            files.save_best_test_users(epoch, test_users)
        progress.stopped_early = stop
        record.update(valid=valid, test=test, eval_seconds=eval_seconds)
        files.log(reporting.epoch_line(epoch, loss, train_seconds, eval_seconds, valid, test,
                                       improved, metric))
    else:
        files.log(f'epoch {epoch:4d}  loss {loss:.4f}  train {train_seconds:6.2f}s')
    return record, improved


def log_stop(progress: Progress, cfg, files: PointFiles) -> None:
    if progress.stopped_early:
        files.log(f'early stopping: no better valid {cfg.eval.valid_metric.lower()} for '
                  f'{cfg.train.stopping_step} evaluations; best epoch {progress.best_epoch}')


def point_result(progress: Progress, epochs: int) -> dict:
    finished = progress.stopped_early or progress.epochs_done >= int(epochs)
    return {'finished': finished, 'epochs_done': progress.epochs_done,
            'best_epoch': progress.best_epoch, 'best_valid': progress.best_valid,
            'best_test': progress.best_test, 'history': progress.history}


def state_to_save(state: TrainState, key: jax.Array, partitioner: parallel.Partitioner) -> dict:
    """The arrays of a checkpoint (the key data placed like the state)."""
    return {'params': state.params, 'opt_state': state.opt_state, 'carry': state.carry,
            'rng': partitioner.replicate(jax.random.key_data(key))}


# ----------------------------------------------------------------------------------------------
# A group of points (one point: a plain run)
# ----------------------------------------------------------------------------------------------

def _same(leaves) -> bool:
    first = leaves[0]
    return all(x is first for x in leaves) or all(
        np.shape(x) == np.shape(first) and np.asarray(x).dtype == np.asarray(first).dtype
        and np.array_equal(np.asarray(x), np.asarray(first)) for x in leaves[1:])


def stack_or_share(trees: Sequence):
    """One pytree from per-point pytrees of the same structure: leaves equal in every point are
    shared (vmap axis None), the others stacked on a new leading axis (vmap axis 0).

    Returns:
      (tree, axes): the tree and a matching pytree of vmap in_axes.
    """
    leaves, treedefs = zip(*(jax.tree.flatten(t) for t in trees))
    if any(t != treedefs[0] for t in treedefs[1:]):
        raise ValueError('the points of a vmapped group have inputs of different structure; '
                         'use --config.sweep.mode=sequential')
    merged, axes = [], []
    for per_point in zip(*leaves):
        if _same(per_point):
            merged.append(per_point[0])
            axes.append(None)
        else:
            if len({np.shape(x) for x in per_point}) > 1:
                raise ValueError('the points of a vmapped group have inputs of different '
                                 'shapes; use --config.sweep.mode=sequential')
            merged.append(jnp.stack([jnp.asarray(x) for x in per_point]))
            axes.append(0)
    return treedefs[0].unflatten(merged), treedefs[0].unflatten(axes)


def take(tree, index, axes=None):
    """The points `index` (an int or an index array) of a stacked tree; shared leaves kept."""
    if axes is None:
        return jax.tree.map(lambda x: x[index], tree)
    return jax.tree.map(lambda x, a: x if a is None else x[index], tree, axes,
                        is_leaf=lambda x: x is None)


class _MemoPlacement:
    """The partitioner's placement calls, memoised on the identity of the host value: inputs
    that the points of a group share (the same feature arrays) are placed once."""

    def __init__(self, partitioner: parallel.Partitioner):
        self._p, self._memo = partitioner, {}

    def _once(self, value, how: tuple, place: Callable):
        key = (id(value),) + how
        if key not in self._memo:
            self._memo[key] = (value, place())  # keeps `value` alive, so its id stays unique
        return self._memo[key][1]

    def split_items(self, value, axis: int):
        return None if value is None else self._once(
            value, ('items', axis), lambda: self._p.split_items(value, axis))

    def split(self, value, axis: int, fill=0):
        return self._once(value, ('split', axis, fill), lambda: self._p.split(value, axis, fill))

    def replicate(self, tree):
        return jax.tree.map(lambda x: self._once(x, ('rep',), lambda: self._p.replicate(x)), tree)

    def __getattr__(self, name):
        return getattr(self._p, name)


def _share_equal_leaves(trees: list) -> list:
    """Host trees where every leaf equal to the first tree's leaf is that same object (so that
    memoised placement shares it)."""
    first, treedef = jax.tree.flatten(trees[0])
    out = [trees[0]]
    for tree in trees[1:]:
        leaves, other = jax.tree.flatten(tree)
        if other != treedef:
            out.append(tree)
            continue
        out.append(treedef.unflatten([a if _same([a, b]) else b
                                      for a, b in zip(first, leaves)]))
    return out


class _Point:
    """Host-side state of one point of a group."""

    def __init__(self, cfg, setup: PointSetup, workdir: Path, label: str, primary: bool):
        self.cfg, self.setup, self.label = cfg, setup, label
        self.progress = Progress(epochs_done=0, model_state=setup.model.host_init(cfg.model))
        self.files = PointFiles(workdir, int(cfg.checkpoint.keep_last), primary,
                                tensorboard=bool(cfg.checkpoint.get('tensorboard', True)),
                                label=f'[{label}] ' if label else '')
        self.diverged: Optional[str] = None
        self.learning_rate = 0.0

    @property
    def active(self) -> bool:
        p = self.progress
        return (self.diverged is None and not p.stopped_early
                and p.epochs_done < int(self.cfg.train.epochs))

    def result(self) -> dict:
        if self.diverged is not None:
            return {'finished': True, 'diverged': self.diverged, 'best_epoch': -1,
                    'best_valid': None, 'best_test': None, 'history': []}
        return point_result(self.progress, self.cfg.train.epochs)


def setup_points(cfgs, data, partitioner, vmapped: bool,
                 abstract: bool = False) -> List[PointSetup]:
    """Each point's set-up (`setup_point`); in a vmapped group, inputs equal across points are
    placed once."""
    if not vmapped:
        return [setup_point(cfgs[0], data, partitioner, abstract=abstract)]
    options = run_options(cfgs[0]).for_vmap()
    model = models.get_model(cfgs[0].model_name)
    hosts = _share_equal_leaves([model.frozen_inputs(data.model, data.dataset, c.model)
                                 for c in cfgs])
    placement = _MemoPlacement(partitioner)
    return [setup_point(cfg, data, partitioner, options, placement, frozen_host=host,
                        abstract=abstract) for cfg, host in zip(cfgs, hosts)]


def train_points(cfgs: Sequence, data: PreparedData, workdirs: Sequence[Path], *,
                 resume: bool = False, stop_after_epochs: Optional[int] = None,
                 partitioner: Optional[parallel.Partitioner] = None,
                 labels: Optional[Sequence[str]] = None) -> List[dict]:
    """Train the points `cfgs` side by side (one point: a plain run); one result dict per point.

    A point that diverges (NaN or Inf loss) stops, and its result says 'diverged' with the
    epoch and batch. Several points must share `sweep.static_signature` (sweep.py groups them).

    Args:
      cfgs: the points' configs (scalar fields: `model`, `optim`, `train`, `eval`,
        `checkpoint`, optionally `graph`, `parallel`).
      data: shared dataset-derived inputs (`prepare_data`).
      workdirs: one directory per point (checkpoints, metrics.jsonl).
      resume: continue each point from its latest checkpoint if it has one.
      stop_after_epochs: stop (as if interrupted) after this many epochs of this call.
      partitioner: the devices; by default built from the first config's `parallel` section.
      labels: prefixes for each point's progress lines.
    """
    ds = data.dataset
    vmapped = len(cfgs) > 1
    for c in cfgs:
        check_point_config(c, ds.n_users, ds.n_items)
    partitioner = partitioner or create_partitioner(cfgs[0].get('parallel'))
    cfgs = [for_platform(c) for c in cfgs]
    setups = setup_points(cfgs, data, partitioner, vmapped)
    labels = labels or [''] * len(cfgs)
    points = [_Point(c, s, Path(w), l, partitioner.is_primary)
              for c, s, w, l in zip(cfgs, setups, workdirs, labels)]
    for p in points:
        restored = None
        if resume:
            s = p.setup
            restored = p.files.checkpoints.restore_intact(
                state_to_save(s.state, s.key, partitioner), warn=p.files.log)
        if restored is not None:
            saved = restored.state
            p.setup = s._replace(state=TrainState(saved['params'], saved['opt_state'],
                                                  saved['carry']))
            p.progress = Progress(**restored.progress)
            p.files.log(f'resumed from {p.files.checkpoints.directory} after epoch '
                        f'{p.progress.epochs_done - 1}')
        p.files.restart_metrics(p.progress.history)
    slots = [i for i, p in enumerate(points) if p.active]
    if slots:
        _run_rounds(points, slots, data, partitioner, stop_after_epochs, vmapped)
    results = [p.result() for p in points]
    for p, result in zip(points, results):
        p.files.close()
        if result['finished']:
            p.files.finish_test_users(None if result.get('diverged') else result['best_epoch'])
    return results


def _run_rounds(points, slots, data, partitioner, stop_after_epochs, vmapped) -> None:
    """Epoch rounds: every active point advances one epoch per round."""
    s0, c0 = points[0].setup, points[0].cfg
    model, options = s0.model, s0.options
    eval_mode = str(c0.eval.get('embeddings', 'last_batch'))
    if vmapped:
        state = stack_states(partitioner, [points[i].setup.state for i in slots])
    else:
        state = s0.state
    for i in slots:
        points[i].setup = points[i].setup._replace(state=None)  # the group state holds it now
    frozen_of = {}  # per tuple of slots: (frozen, frozen axes)
    fns_of = {}     # per (slots, epoch-input axes): EpochFns

    rounds = 0
    remaining = max(int(points[i].cfg.train.epochs) - points[i].progress.epochs_done
                    for i in slots)
    with progress.bar(remaining, 'training', unit='epoch') as epochs_bar:
        while slots and (stop_after_epochs is None or rounds < stop_after_epochs):
            slots, state = _run_round(points, slots, state, data, partitioner, vmapped,
                                      model, options, eval_mode, frozen_of, fns_of)
            rounds += 1
            epochs_bar.update()
            epochs_bar.set_postfix_str(_bar_postfix([points[i] for i in slots] or points))


def _bar_postfix(points) -> str:
    """The best valid score so far of the points still training, for the epochs bar."""
    scores = [p.progress.best_valid_score for p in points if p.progress.best_valid is not None]
    metric = points[0].cfg.eval.valid_metric.lower()
    return f'best valid {metric} {max(scores):.4f}' if scores else ''


def _run_round(points, slots, state, data, partitioner, vmapped, model, options, eval_mode,
               frozen_of, fns_of) -> tuple:
    """One epoch of every active point of `slots`; returns (slots still active, group state)."""
    s0 = points[0].setup
    t0 = time.perf_counter()
    epoch = points[slots[0]].progress.epochs_done
    epochs = []
    for i in slots:
        p = points[i]
        drawn = draw_point_epoch(model, p.cfg, data, p.progress.model_state, p.setup.epoch_key,
                                 p.progress.epochs_done, partitioner, options)
        p.progress.model_state, p.learning_rate = drawn.host, drawn.scalars['learning_rate']
        epochs.append(drawn)
    ei, ei_axes, sc, key, active, stacked = group_epoch(
        partitioner, epochs, [points[i].active for i in slots] if vmapped else None)
    if not vmapped:
        frozen, frozen_axes, fns_key = s0.frozen, None, None
    else:
        if tuple(slots) not in frozen_of:
            frozen_of[tuple(slots)] = group_frozen(partitioner,
                                                   [points[i].setup for i in slots])
        frozen, frozen_axes = frozen_of[tuple(slots)]
        fns_key = (tuple(slots), str(ei_axes))
    if fns_key not in fns_of:
        fns_of[fns_key] = make_epoch_fns(s0, partitioner, eval_mode,
                                         (frozen_axes, ei_axes) if vmapped else None)
    fns = fns_of[fns_key]
    state = fns.start_epoch(state, active)
    state, step_losses = run_epoch(fns, state, stacked, frozen, ei, sc, key, active, epoch,
                                   partitioner, options.scan_epoch)
    train_seconds = time.perf_counter() - t0
    for slot, i in enumerate(slots):
        if vmapped:
            view = (take(state, slot), take(frozen, slot, frozen_axes),
                    take(ei, slot, ei_axes), take(sc, slot), step_losses[:, slot])
        else:
            view = (state, frozen, ei, sc, step_losses)
        _end_point_epoch(points[i], view, fns, train_seconds, data, partitioner)
    still = [slot for slot, i in enumerate(slots) if points[i].active]
    if not still:
        slots = []
    elif vmapped and len(still) <= len(slots) // 2:
        # Compact: drop finished points from the stacked state (one recompilation).
        state = partitioner.replicate(take(state, np.array(still)))
        slots = [slots[slot] for slot in still]
    return slots, state


class PointEpoch(NamedTuple):
    """One point's inputs of one epoch, drawn on the host (`draw_point_epoch`).

    Attributes:
      host: the model's host state after the epoch's schedule.
      scalars: the epoch's scalars (Python floats, 'learning_rate' included).
      key: the point's epoch key folded with the epoch.
      batches: the epoch's host batches of the model's kind, (n_batches, batch) each.
      epoch_inputs: the model's per-epoch inputs, placed (`place_epoch_inputs`), or None.
    """
    host: dict
    scalars: dict
    key: jax.Array
    batches: Any
    epoch_inputs: Any


def draw_point_epoch(model: base.Model, cfg, data: PreparedData, host: dict, epoch_key,
                     epoch: int, partitioner: parallel.Partitioner,
                     options: RunOptions) -> PointEpoch:
    """What one point trains epoch `epoch` (0-based) on, given its host state before it."""
    host, scalars = epoch_scalars(model, cfg, host, epoch)
    key = jax.random.fold_in(epoch_key, epoch)
    batches = sampling.batch_kind(model.batch_kind).draw(
        sampling.epoch_rng(int(cfg.train.seed), epoch), data.sampler, int(cfg.train.batch_size))
    inputs = model.epoch_inputs(data.model, cfg.model, key, epoch)
    return PointEpoch(host, scalars, key, batches,
                      place_epoch_inputs(partitioner, inputs, options))


class GroupEpoch(NamedTuple):
    """The epoch functions' per-epoch arguments of a round (`group_epoch`): one point's, or a
    vmapped group's with a leading point axis (leaves equal in every point shared).

    Attributes:
      epoch_inputs, epoch_axes: the per-epoch inputs on the devices and their vmap axes (None
        for one point).
      scalars: {name: float32} replicated ((points,) in a group).
      key: the epoch key(s), replicated.
      active: None for one point; (points,) bool, replicated, in a group.
      batches: the host batches, (n_batches, batch) or (n_batches, points, batch) each
        (`run_epoch` places them).
    """
    epoch_inputs: Any
    epoch_axes: Any
    scalars: dict
    key: jax.Array
    active: Optional[jax.Array]
    batches: Any


def group_epoch(partitioner: parallel.Partitioner, epochs: Sequence[PointEpoch],
                active: Optional[Sequence[bool]]) -> GroupEpoch:
    """The round's arguments of the points' drawn `epochs`; `active` None: a single point
    trained alone (no point axis), else the group's active mask."""
    if active is None:
        (e,) = epochs
        return GroupEpoch(e.epoch_inputs, None, partitioner.replicate(device_scalars(e.scalars)),
                          partitioner.replicate(e.key), None, e.batches)
    ei, ei_axes = stack_or_share([e.epoch_inputs for e in epochs])
    scalars = [e.scalars for e in epochs]
    return GroupEpoch(
        _replicate_stacked(partitioner, ei, ei_axes), ei_axes,
        partitioner.replicate({k: jnp.asarray(np.array([s[k] for s in scalars], np.float64),
                                              jnp.float32) for k in scalars[0]}),
        partitioner.replicate(jnp.stack([e.key for e in epochs])),
        partitioner.replicate(jnp.asarray(list(active))),
        # (n_batches, points, batch): the scan runs over batches, vmap over points.
        type(epochs[0].batches)(*(np.stack(a, axis=1)
                                  for a in zip(*[e.batches for e in epochs]))))


def stack_states(partitioner: parallel.Partitioner, states: Sequence[TrainState]) -> TrainState:
    """A vmapped group's state: the points' states stacked on a leading axis, replicated (of
    abstract states, `jax.ShapeDtypeStruct`s)."""
    stack = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(states)):
        return partitioner.replicate_shapes(jax.eval_shape(stack, *states))
    return partitioner.replicate(stack(*states))


def group_frozen(partitioner: parallel.Partitioner, setups: Sequence[PointSetup]) -> tuple:
    """(frozen, vmap axes) of a vmapped group: the points' frozen inputs, leaves equal in every
    point shared (kept where they were placed), the others stacked and replicated."""
    frozen, axes = stack_or_share([s.frozen for s in setups])
    return _replicate_stacked(partitioner, frozen, axes), axes


def _replicate_stacked(partitioner, tree, axes):
    """The stacked leaves of a `stack_or_share` tree replicated (shared ones keep their
    placement)."""
    if tree is None:
        return None
    return jax.tree.map(lambda x, a: x if a is None else partitioner.replicate(x), tree, axes,
                        is_leaf=lambda x: x is None)


def _end_point_epoch(p: _Point, view: tuple, fns: EpochFns, train_seconds: float,
                     data: PreparedData, partitioner) -> None:
    """One point's bookkeeping after a round: loss, evaluation, early stopping, files."""
    state, frozen, epoch_inputs, scalars, losses = view
    cfg, epoch = p.cfg, p.progress.epochs_done
    if not p.active:
        return
    try:
        loss = summed_loss(np.asarray(losses), epoch)
    except TrainingDiverged as err:
        p.diverged = str(err)
        p.files.log(f'diverged: {err}')
        return

    def evaluate():
        users, items = fns.eval_embeddings(state.params, state.carry, frozen, epoch_inputs,
                                           scalars)
        return evaluate_splits(users, items, data, cfg.eval, partitioner, per_user=True)

    record, improved = record_epoch(p.progress, cfg, epoch, p.learning_rate, loss,
                                    train_seconds, evaluate, p.files)
    p.files.end_epoch(p.progress, record, state_to_save(state, p.setup.key, partitioner),
                      improved)
    log_stop(p.progress, cfg, p.files)


def train_and_evaluate(cfg, data: PreparedData, workdir: Path, *, resume: bool = False,
                       stop_after_epochs: Optional[int] = None,
                       partitioner: Optional[parallel.Partitioner] = None) -> dict:
    """Train one grid point to early stopping; returns its result dict (`train_points`).
    Raises TrainingDiverged if the loss becomes NaN or Inf."""
    result = train_points([cfg], data, [workdir], resume=resume,
                          stop_after_epochs=stop_after_epochs, partitioner=partitioner)[0]
    if result.get('diverged'):
        raise TrainingDiverged(result['diverged'])
    return result
