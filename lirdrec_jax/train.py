"""Training of one configuration (one grid point): epochs, evaluation, early stopping, resume.

The state that the reference keeps in module attributes is explicit here:
- `TrainState.attention` is the fusion attention of the last training batch; at the start of
  the next epoch it overwrites the PWC table theta (the reference's `theta.data = last_att`).
- `TrainState.user_emb/item_emb` are the representations of the last training forward pass,
  computed before that batch's optimiser step; the reference evaluates on exactly these (its
  cached `result_embed`). `eval.embeddings = 'fresh'` evaluates on a new forward pass instead.
- `Progress` is the host-side state: epoch, the PWC weights w1/w2, early stopping, history.

Where arrays live is the business of a `parallel.Partitioner` (all local devices by default;
one device gives the same computation as plain `jit`). The speed options of a point
(`RunOptions`: sparse product, tower precision, scanned epochs) are read from the config once.
`sweep.py` trains several points side by side with the same pieces.
"""
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lirdrec_jax import evaluation, graph, losses, optim, parallel, reporting, sampling
from lirdrec_jax.checkpointing import RunCheckpoints
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import lirdrec
from lirdrec_jax.models.layers import MATMUL_DTYPES


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the message names the epoch and batch."""


class TrainState(NamedTuple):
    """Device-side state, passed into and returned by `train_step`.

    Attributes:
      params: the model's parameter pytree.
      opt_state: Adam's moments and step count.
      attention: (n_users, 3) fusion attention of the last training forward.
      user_emb: (n_users, 3*dim) users of the last training forward (evaluation quirk).
      item_emb: (n_items, 3*dim) items of the last training forward.
    """
    params: Any
    opt_state: Any
    attention: jax.Array
    user_emb: jax.Array
    item_emb: jax.Array


class StepScalars(NamedTuple):
    """Per-step scalars, passed as arrays so that changing them never recompiles."""
    w1: jax.Array
    w2: jax.Array
    learning_rate: jax.Array
    reg_weight: jax.Array


class Batch(NamedTuple):
    """(batch,) int32 users, positives, negatives and float32 weights (0 on padding rows)."""
    users: jax.Array
    positives: jax.Array
    negatives: jax.Array
    weights: jax.Array


@dataclasses.dataclass
class Progress:
    """Host-side training state, saved as JSON in every checkpoint."""
    epochs_done: int
    w1: float
    w2: float
    best_valid_score: float = -1.0
    stale_evaluations: int = 0
    best_epoch: int = -1
    best_valid: Optional[dict] = None
    best_test: Optional[dict] = None
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)


class PreparedData(NamedTuple):
    """Everything derived once from a dataset and shared by all grid points."""
    dataset: MMRecDataset
    features: lirdrec.ItemFeatures
    norm_adj: Any
    edges: graph.TrainEdges
    sampler: sampling.SamplerTables
    valid: evaluation.EvalSplit
    test: evaluation.EvalSplit
    ranking: evaluation.SharedRanking  # one ranking of valid's and test's users for both


def prepare_data(dataset: MMRecDataset) -> PreparedData:
    train = dataset.train
    return PreparedData(
        dataset=dataset,
        features=lirdrec.item_features(dataset.image_feat, dataset.text_feat),
        norm_adj=graph.norm_adjacency(train.users, train.items, dataset.n_users, dataset.n_items),
        edges=graph.train_edges(train.users, train.items, dataset.n_users, dataset.n_items),
        sampler=sampling.sampler_tables(train.users, train.items, dataset.n_items),
        valid=evaluation.build_eval_split(dataset.valid.users, dataset.valid.items,
                                          train.users, train.items),
        test=evaluation.build_eval_split(dataset.test.users, dataset.test.items,
                                         train.users, train.items),
        ranking=evaluation.build_shared_ranking(
            (dataset.valid.users, dataset.test.users), (dataset.valid.items, dataset.test.items),
            train.users, train.items))


def create_item_graph(data: PreparedData, knn_k: int, mm_image_weight: float):
    """The frozen kNN item graph of one (knn_k, mm_image_weight) point (seconds to build)."""
    ds = data.dataset
    feats = [f for f in (ds.image_feat, ds.text_feat) if f is not None]
    weights = graph.modality_weights(ds.image_feat is not None, ds.text_feat is not None,
                                     mm_image_weight)
    return graph.knn_item_graph(feats, weights, knn_k)


def create_model(model_cfg, n_users: int, n_items: int,
                 partitioner: Optional[parallel.Partitioner] = None) -> lirdrec.LIRDRec:
    """The model of one point; with a partitioner of several devices, with its layout hook."""
    return lirdrec.LIRDRec(n_users=n_users, n_items=n_items, dim=int(model_cfg.embedding_size),
                           n_ui_layers=int(model_cfg.n_ui_layers),
                           n_mm_layers=int(model_cfg.n_mm_layers),
                           matmul_dtype=str(model_cfg.get('matmul_dtype', 'float32')),
                           layout=None if partitioner is None else partitioner.layout_hook())


def create_train_state(key: jax.Array, model, optimizer, features, graphs) -> TrainState:
    params = model.init(key, features, graphs, 1.0, 0.0)['params']
    theta = params['fusion']['theta']
    # Before any forward pass the reference's `last_att` is theta itself, so the overwrite at
    # the start of epoch 1 changes nothing; starting `attention` at theta reproduces that.
    n_users, n_items, width = model.n_users, model.n_items, 3 * model.dim
    return TrainState(params, optimizer.init(params), theta,
                      jnp.zeros((n_users, width), jnp.float32),
                      jnp.zeros((n_items, width), jnp.float32))


# ----------------------------------------------------------------------------------------------
# Speed options and placement
# ----------------------------------------------------------------------------------------------

class RunOptions(NamedTuple):
    """How a point is computed (not what): the defaults give exactly the numbers of plain
    single-device training; every other choice the same numbers up to float32 rounding, except
    `matmul_dtype='bfloat16'` (docs/performance.md).

    Attributes:
      spmm_impl: 'bcoo' or 'segment_sum' (graph.SPMM_IMPLS).
      spmm_chunk_size: entries per chunk of 'segment_sum' (0 = one chunk).
      matmul_dtype: 'float32' or 'bfloat16', of the towers' first layers.
      transposed_features: keep transposed feature copies for the towers' weight gradients.
      scan_epoch: run an epoch's batches in one compiled `lax.scan` (bit-identical to one
        dispatch per batch on every run we compared, and faster; no progress lines within an
        epoch).
      cpu_dot: 'xla' or 'eigen': which GEMM kernels XLA:CPU uses in the training computations
        (`parallel.compiler_options`); no effect on GPU/TPU.
    """
    spmm_impl: str = 'bcoo'
    spmm_chunk_size: int = 0
    matmul_dtype: str = 'float32'
    transposed_features: bool = False
    scan_epoch: bool = True
    cpu_dot: str = 'xla'

    @property
    def compiler_options(self) -> Optional[dict]:
        """XLA options of the training step/epoch (None: XLA's defaults)."""
        return parallel.compiler_options(self.cpu_dot)


# CPU: chunks of this many entries keep the sparse product's intermediates in cache.
CPU_SPMM_CHUNK = 4096


def run_options(cfg) -> RunOptions:
    """The point's RunOptions; config sections or fields that are absent take the defaults of
    configs/lirdrec.py. `graph.spmm_chunk_size = -1` means CPU_SPMM_CHUNK on the CPU and one
    chunk on GPU/TPU."""
    g = cfg.get('graph') or {}
    chunk = int(g.get('spmm_chunk_size', -1))
    if chunk < 0:
        chunk = CPU_SPMM_CHUNK if parallel.platform() == 'cpu' else 0
    return RunOptions(spmm_impl=str(g.get('spmm_impl', 'bcoo')), spmm_chunk_size=chunk,
                      matmul_dtype=str(cfg.model.get('matmul_dtype', 'float32')),
                      transposed_features=bool(cfg.model.get('transposed_features', False)),
                      scan_epoch=bool(cfg.train.get('scan_epoch', True)),
                      cpu_dot=str(cfg.model.get('cpu_dot', 'xla')))


def create_partitioner(parallel_cfg) -> parallel.Partitioner:
    """The devices of a run (`parallel` config section; absent = all devices, items split)."""
    p = parallel_cfg or {}
    return parallel.Partitioner(num_devices=int(p.get('num_devices', 0)),
                                shard_items=bool(p.get('shard_items', True)))


def place_features(partitioner: parallel.Partitioner, features: lirdrec.ItemFeatures,
                   options: RunOptions) -> lirdrec.ItemFeatures:
    """The features in the options' dtype and layout, split by item over the devices."""
    laid = lirdrec.feature_layout(features, options.matmul_dtype, options.transposed_features)
    rows = [partitioner.split_items(x, 0) for x in laid[:3]]
    cols = [partitioner.split_items(x, 1) for x in laid[3:]]
    return lirdrec.ItemFeatures(*rows, *cols)


def place_graphs(partitioner: parallel.Partitioner, graphs: lirdrec.Graphs,
                 options: RunOptions) -> lirdrec.Graphs:
    """Both graphs in the options' sparse representation, replicated on every device."""
    return partitioner.replicate(lirdrec.Graphs(
        *(graph.spmm_operand(g, options.spmm_impl, options.spmm_chunk_size) for g in graphs)))


def place_state(partitioner: parallel.Partitioner, state: TrainState) -> TrainState:
    return partitioner.replicate(state)


def place_batches(partitioner: parallel.Partitioner, batches: sampling.EpochBatches) -> Batch:
    """An epoch's (n_batches, batch) host arrays on the devices, each batch split over them
    (zero-weight padding rows up to a multiple of the device count: the loss is unchanged)."""
    return Batch(*(partitioner.split(a, axis=a.ndim - 1) for a in batches))


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------

def make_loss_fn(model):
    """`loss_fn(params, batch, features, graphs, scalars) -> (loss, (users, items, attention))`."""

    def loss_fn(params, batch: Batch, features, graphs, scalars: StepScalars):
        users, items, attention = model.apply({'params': params}, features, graphs,
                                              scalars.w1, scalars.w2)
        ranking = losses.bpr_loss(users[batch.users], items[batch.positives],
                                  items[batch.negatives], batch.weights)
        loss = ranking + scalars.reg_weight * losses.embedding_l2(users, items)
        return loss, (users, items, attention)

    return loss_fn


def apply_gradients(optimizer, params, opt_state, grads, learning_rate) -> tuple:
    """One Adam step scaled by the epoch's learning rate. Returns (params, opt_state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state


def train_step_fn(model, optimizer) -> Callable:
    """The pure (not jitted) `train_step(state, batch, features, graphs, scalars) -> (state, loss)`."""
    loss_fn = make_loss_fn(model)

    def train_step(state: TrainState, batch: Batch, features, graphs, scalars: StepScalars):
        (loss, (users, items, attention)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, features, graphs, scalars)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads,
                                            scalars.learning_rate)
        return TrainState(params, opt_state, attention, users, items), loss

    return train_step


def make_train_step(model, optimizer, partitioner: Optional[parallel.Partitioner] = None,
                    compiler_options: Optional[dict] = None):
    """Returns the jitted `train_step(state, batch, features, graphs, scalars) -> (state, loss)`.

    The step is a pure function of its arguments. With a partitioner its inputs keep the
    shardings they were placed with (`place_*`) and its outputs are replicated; without one it
    runs on the default device. `compiler_options`: `RunOptions.compiler_options`.
    """
    step = train_step_fn(model, optimizer)
    if partitioner is None:
        return jax.jit(step, donate_argnums=0, compiler_options=compiler_options)
    return partitioner.jit(step, donate_argnums=0, compiler_options=compiler_options)


def make_train_epoch(model, optimizer, partitioner: parallel.Partitioner,
                     compiler_options: Optional[dict] = None):
    """Returns the jitted `train_epoch(state, batches, features, graphs, scalars) ->
    (state, (n_batches,) losses)`: all batches of an epoch in one `lax.scan` on the devices."""
    step = train_step_fn(model, optimizer)

    def train_epoch(state: TrainState, batches: Batch, features, graphs, scalars):
        # The steps never read the incoming attention (each overwrites it); starting the carry
        # from zeros leaves the input unused, so a state whose theta and attention are one
        # buffer (after the epoch-start overwrite) is not donated twice.
        state = state._replace(attention=jnp.zeros_like(state.attention))
        return jax.lax.scan(lambda s, b: step(s, b, features, graphs, scalars), state, batches)

    return partitioner.jit(train_epoch, donate_argnums=0, compiler_options=compiler_options)


def make_forward(model, partitioner: Optional[parallel.Partitioner] = None):
    def forward(params, features, graphs, w1, w2):
        return model.apply({'params': params}, features, graphs, w1, w2)
    return jax.jit(forward) if partitioner is None else partitioner.jit(forward)


def epoch_graphs(data: PreparedData, item_graph, dropout: float, key: jax.Array,
                 n_users: int, n_items: int) -> lirdrec.Graphs:
    """The user-item graph of one epoch: the full normalised adjacency, or a dropout sample."""
    if dropout <= 0.0:
        return lirdrec.Graphs(data.norm_adj, item_graph)
    keep = int(data.edges.users.shape[0] * (1.0 - dropout))
    return lirdrec.Graphs(graph.edge_dropout_adjacency(key, data.edges, keep, n_users, n_items),
                          item_graph)


def with_theta(params, theta):
    """params with the PWC table replaced (a new dict; nothing is mutated)."""
    return {**params, 'fusion': {**params['fusion'], 'theta': theta}}


def summed_loss(step_losses: np.ndarray, epoch: int) -> float:
    """The epoch's summed loss; raises TrainingDiverged naming the first bad batch."""
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
        raise TrainingDiverged(f'training loss is {step_losses[bad[0]]} at epoch {epoch}, '
                               f'batch {bad[0]}')
    return float(step_losses.sum())


def run_epoch(train_step, state: TrainState, batches: sampling.EpochBatches, features,
              graphs, scalars: StepScalars, epoch: int,
              partitioner: Optional[parallel.Partitioner] = None) -> tuple:
    """All batches of one epoch, one dispatch per batch. Returns (state, summed loss); raises
    TrainingDiverged. With a partitioner, batches are split over its devices."""
    n_batches = batches.users.shape[0]
    progress = reporting.BatchProgress(epoch, n_batches)
    if partitioner is not None:
        on_device = place_batches(partitioner, batches)
        batch_at = lambda b: Batch(*(a[b] for a in on_device))
    else:
        batch_at = lambda b: Batch(*(jnp.asarray(a[b]) for a in batches))
    step_losses = []
    for b in range(n_batches):
        state, loss = train_step(state, batch_at(b), features, graphs, scalars)
        step_losses.append(loss)
        if progress.should_report(b):
            loss.block_until_ready()
            progress.report(b)
    to_host = np.asarray if partitioner is None else partitioner.to_host
    return state, summed_loss(to_host(jnp.stack(step_losses)), epoch)


def run_epoch_scanned(train_epoch, state: TrainState, batches: sampling.EpochBatches, features,
                      graphs, scalars: StepScalars, epoch: int,
                      partitioner: parallel.Partitioner) -> tuple:
    """`run_epoch` as one compiled scan over the epoch's batches (`make_train_epoch`)."""
    state, step_losses = train_epoch(state, place_batches(partitioner, batches), features,
                                     graphs, scalars)
    return state, summed_loss(partitioner.to_host(step_losses), epoch)


# ----------------------------------------------------------------------------------------------
# Epoch bookkeeping (shared with sweep.py)
# ----------------------------------------------------------------------------------------------

def early_stopping(progress: Progress, score: float, stopping_step: int) -> tuple:
    """The reference's rule: a strictly better (rounded) score resets the counter; the run stops
    when the counter exceeds `stopping_step`. Returns (improved, stop)."""
    if score > progress.best_valid_score:
        progress.best_valid_score, progress.stale_evaluations = score, 0
        return True, False
    progress.stale_evaluations += 1
    return False, progress.stale_evaluations > stopping_step


def epoch_schedule(progress: Progress, m, o, epoch: int) -> tuple:
    """(w1, w2, learning rate) of `epoch` (0-based): the PWC schedule applied at the start of
    the epoch (the reference's pre_epoch_processing) and the learning-rate schedule."""
    w1, w2 = lirdrec.pwc_weights_for_epoch(progress.w1, progress.w2, epoch + 1,
                                           float(m.decay_base))
    lr = optim.learning_rate_at(epoch, float(o.learning_rate), float(o.lr_decay_factor),
                                float(o.lr_decay_epochs))
    return w1, w2, lr


def step_scalars(w1: float, w2: float, lr: float, reg_weight: float) -> StepScalars:
    return StepScalars(*(jnp.float32(v) for v in (w1, w2, lr, reg_weight)))


def evaluate_splits(user_emb, item_emb, data: PreparedData, e,
                    partitioner: Optional[parallel.Partitioner]) -> tuple:
    """(valid, test) metric dicts of one pair of embeddings (one shared ranking of their
    users: both splits mask the same training items, see `evaluation.SharedRanking`)."""
    ks, metrics = tuple(e.topk), tuple(m_.lower() for m_ in e.metrics)
    return evaluation.evaluate_shared(user_emb, item_emb, data.ranking, (data.valid, data.test),
                                      metrics=metrics, ks=ks, batch_size=int(e.batch_size),
                                      partitioner=partitioner)


class PointFiles:
    """The outputs of one grid point: checkpoints, metrics.jsonl, progress lines. In a
    multi-process run only the primary process writes files and logs (all of them take part in
    saving checkpoints, which orbax coordinates)."""

    def __init__(self, workdir: Path, keep_last: int, primary: bool = True, label: str = ''):
        self.workdir, self.primary, self.label = Path(workdir), primary, label
        self.checkpoints = RunCheckpoints(self.workdir / 'ckpt', keep_last)

    def log(self, message: str) -> None:
        if self.primary:
            reporting.log(self.label + message)

    def end_epoch(self, progress: Progress, record: dict, saved_state: dict,
                  improved: bool) -> None:
        progress.history.append(record)
        if self.primary:
            reporting.append_json_line(self.workdir / 'metrics.jsonl', record)
        self.checkpoints.save(progress.epochs_done, saved_state, dataclasses.asdict(progress),
                              improved)

    def close(self) -> None:
        self.checkpoints.close()


def record_epoch(progress: Progress, cfg, epoch: int, schedule: tuple, loss: float,
                 train_seconds: float, evaluate: Callable[[], tuple], files: PointFiles) -> tuple:
    """Everything after an epoch's training: PWC bookkeeping, evaluation on eval epochs, early
    stopping, the progress line. Returns (record, improved)."""
    t, metric = cfg.train, cfg.eval.valid_metric.lower()
    w1, w2, lr = schedule
    progress.w1, progress.w2 = w1, w2
    progress.epochs_done = epoch + 1
    record = {'epoch': epoch, 'loss': loss, 'learning_rate': lr, 'w1': w1, 'w2': w2,
              'train_seconds': train_seconds}
    improved = False
    if (epoch + 1) % int(t.eval_step) == 0:
        t1 = time.perf_counter()
        valid, test = evaluate()
        eval_seconds = time.perf_counter() - t1
        improved, stop = early_stopping(progress, valid[metric], int(t.stopping_step))
        if improved:
            progress.best_epoch, progress.best_valid, progress.best_test = epoch, valid, test
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


def _state_to_save(state: TrainState, key: jax.Array,
                   partitioner: Optional[parallel.Partitioner] = None) -> dict:
    """The arrays of a checkpoint; with a partitioner the key data are placed like the state."""
    rng = jax.random.key_data(key)
    return {'params': state.params, 'opt_state': state.opt_state, 'attention': state.attention,
            'rng': rng if partitioner is None else partitioner.replicate(rng)}


EVAL_EMBEDDINGS = ('last_batch', 'fresh')


def check_point_config(cfg, n_items: int) -> None:
    """Reject values that would otherwise fail late or silently (names the config field)."""
    metrics = [f'{m.lower()}@{k}' for m in cfg.eval.metrics for k in cfg.eval.topk]
    g = cfg.get('graph') or {}
    checks = [
        (cfg.eval.embeddings in EVAL_EMBEDDINGS, 'eval.embeddings',
         f'one of {EVAL_EMBEDDINGS}'),
        (cfg.eval.valid_metric.lower() in metrics, 'eval.valid_metric',
         f'one of the computed metrics {metrics}'),
        (max(cfg.eval.topk) <= n_items, 'eval.topk', f'cutoffs <= n_items={n_items}'),
        (0.0 <= cfg.model.dropout < 1.0, 'model.dropout', 'in [0, 1)'),
        (1 <= cfg.model.knn_k <= n_items, 'model.knn_k', f'in [1, n_items={n_items}]'),
        (0.0 <= cfg.model.mm_image_weight <= 1.0, 'model.mm_image_weight', 'in [0, 1]'),
        (0.0 <= cfg.model.decay_weight <= 1.0, 'model.decay_weight', 'in [0, 1]'),
        (cfg.train.batch_size >= 1, 'train.batch_size', '>= 1'),
        (cfg.train.eval_step >= 1, 'train.eval_step', '>= 1'),
        (cfg.model.n_ui_layers >= 0 and cfg.model.n_mm_layers >= 0, 'model.n_*_layers', '>= 0'),
        (cfg.model.get('matmul_dtype', 'float32') in MATMUL_DTYPES, 'model.matmul_dtype',
         f'one of {MATMUL_DTYPES}'),
        (cfg.model.get('cpu_dot', 'xla') in parallel.CPU_DOTS, 'model.cpu_dot',
         f'one of {parallel.CPU_DOTS}'),
        (not (cfg.model.get('cpu_dot', 'xla') == 'eigen'
              and cfg.model.get('matmul_dtype', 'float32') == 'bfloat16'), 'model.cpu_dot',
         "'xla' with model.matmul_dtype='bfloat16' (Eigen has no fast bfloat16 GEMM: the "
         "towers ran 3.5x slower)"),
        (g.get('spmm_impl', 'bcoo') in graph.SPMM_IMPLS, 'graph.spmm_impl',
         f'one of {graph.SPMM_IMPLS}'),
        (int(g.get('spmm_chunk_size', -1)) >= -1, 'graph.spmm_chunk_size',
         '-1 (auto), 0 (one chunk) or a chunk size'),
    ]
    for ok, field, expected in checks:
        if not ok:
            section, name = field.split('.', 1)
            raise ValueError(f'config field {field} = {cfg[section].get(name)!r}; expected '
                             f'{expected}')


# ----------------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------------

def train_and_evaluate(cfg, data: PreparedData, workdir: Path, *, resume: bool = False,
                       stop_after_epochs: Optional[int] = None,
                       partitioner: Optional[parallel.Partitioner] = None) -> dict:
    """Train one grid point to early stopping; returns its result dict.

    Args:
      cfg: the point's config (scalar fields: `model`, `optim`, `train`, `eval`, `checkpoint`,
        and optionally `graph`, `parallel`).
      data: shared dataset-derived inputs (`prepare_data`).
      workdir: this point's directory (checkpoints, metrics.jsonl).
      resume: continue from the latest checkpoint in `workdir` if there is one.
      stop_after_epochs: stop (as if interrupted) after this many epochs of this call; used to
        test resumption.
      partitioner: the devices to use; by default built from `cfg.parallel`.
    """
    ds = data.dataset
    m, o, t, e = cfg.model, cfg.optim, cfg.train, cfg.eval
    check_point_config(cfg, ds.n_items)
    partitioner = partitioner or create_partitioner(cfg.get('parallel'))
    options = run_options(cfg)
    model = create_model(m, ds.n_users, ds.n_items, partitioner)
    optimizer = optim.create_optimizer(float(o.weight_decay))
    item_graph = create_item_graph(data, int(m.knn_k), float(m.mm_image_weight))
    key = jax.random.PRNGKey(int(t.seed))
    init_key, dropout_key = jax.random.split(key)
    features = place_features(partitioner, data.features, options)
    graphs0 = place_graphs(partitioner, lirdrec.Graphs(data.norm_adj, item_graph), options)
    state = place_state(partitioner, create_train_state(init_key, model, optimizer, features,
                                                         graphs0))
    progress = Progress(epochs_done=0, w1=float(m.decay_weight), w2=1.0 - float(m.decay_weight))

    files = PointFiles(workdir, int(cfg.checkpoint.keep_last), partitioner.is_primary)
    if resume and files.checkpoints.latest_epoch() is not None:
        saved, saved_progress = files.checkpoints.restore(_state_to_save(state, key, partitioner))
        state = state._replace(params=saved['params'], opt_state=saved['opt_state'],
                               attention=saved['attention'])
        progress = Progress(**saved_progress)
        files.log(f'resumed from {files.checkpoints.directory} after epoch '
                  f'{progress.epochs_done - 1}')

    if options.scan_epoch:
        train_epoch = make_train_epoch(model, optimizer, partitioner, options.compiler_options)
        run = functools.partial(run_epoch_scanned, train_epoch, partitioner=partitioner)
    else:
        train_step = make_train_step(model, optimizer, partitioner, options.compiler_options)
        run = functools.partial(run_epoch, train_step, partitioner=partitioner)
    forward = make_forward(model, partitioner) if e.embeddings == 'fresh' else None
    epochs_this_call = 0
    while progress.epochs_done < int(t.epochs) and not progress.stopped_early:
        epoch = progress.epochs_done  # 0-based, as the reference logs it
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        # Start of epoch (the reference's pre_epoch_processing): PWC schedule and theta reset.
        schedule = epoch_schedule(progress, m, o, epoch)
        state = state._replace(params=with_theta(state.params, state.attention))
        graphs = graphs0 if float(m.dropout) <= 0 else place_graphs(
            partitioner, epoch_graphs(data, item_graph, float(m.dropout),
                                      jax.random.fold_in(dropout_key, epoch), ds.n_users,
                                      ds.n_items), options)
        scalars = step_scalars(*schedule[:3], float(m.reg_weight))
        batches = sampling.epoch_batches(sampling.epoch_rng(int(t.seed), epoch), data.sampler,
                                         int(t.batch_size))
        state, loss = run(state, batches, features, graphs, scalars, epoch)
        train_seconds = time.perf_counter() - t0

        def evaluate():
            if forward is None:
                user_emb, item_emb = state.user_emb, state.item_emb
            else:
                user_emb, item_emb, _ = forward(state.params, features, graphs, scalars.w1,
                                                scalars.w2)
            return evaluate_splits(user_emb, item_emb, data, e, partitioner)

        record, improved = record_epoch(progress, cfg, epoch, schedule, loss, train_seconds,
                                        evaluate, files)
        files.end_epoch(progress, record, _state_to_save(state, key, partitioner), improved)
        epochs_this_call += 1
        log_stop(progress, cfg, files)
    files.close()
    return point_result(progress, t.epochs)
