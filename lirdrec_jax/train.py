"""Training of one configuration (one grid point): epochs, evaluation, early stopping, resume.

The state that the reference keeps in module attributes is explicit here:
- `TrainState.attention` is the fusion attention of the last training batch; at the start of
  the next epoch it overwrites the PWC table theta (the reference's `theta.data = last_att`).
- `TrainState.user_emb/item_emb` are the representations of the last training forward pass,
  computed before that batch's optimiser step; the reference evaluates on exactly these (its
  cached `result_embed`). `eval.embeddings = 'fresh'` evaluates on a new forward pass instead.
- `Progress` is the host-side state: epoch, the PWC weights w1/w2, early stopping, history.
"""
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lirdrec_jax import evaluation, graph, losses, optim, reporting, sampling
from lirdrec_jax.checkpointing import RunCheckpoints
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import lirdrec


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
                                         train.users, train.items))


def create_item_graph(data: PreparedData, knn_k: int, mm_image_weight: float):
    """The frozen kNN item graph of one (knn_k, mm_image_weight) point (seconds to build)."""
    ds = data.dataset
    feats = [f for f in (ds.image_feat, ds.text_feat) if f is not None]
    weights = graph.modality_weights(ds.image_feat is not None, ds.text_feat is not None,
                                     mm_image_weight)
    return graph.knn_item_graph(feats, weights, knn_k)


def create_model(model_cfg, n_users: int, n_items: int) -> lirdrec.LIRDRec:
    return lirdrec.LIRDRec(n_users=n_users, n_items=n_items, dim=int(model_cfg.embedding_size),
                           n_ui_layers=int(model_cfg.n_ui_layers),
                           n_mm_layers=int(model_cfg.n_mm_layers))


def create_train_state(key: jax.Array, model, optimizer, features, graphs) -> TrainState:
    params = model.init(key, features, graphs, 1.0, 0.0)['params']
    theta = params['fusion']['theta']
    # Before any forward pass the reference's `last_att` is theta itself, so the overwrite at
    # the start of epoch 1 changes nothing; starting `attention` at theta reproduces that.
    n_users, n_items, width = model.n_users, model.n_items, 3 * model.dim
    return TrainState(params, optimizer.init(params), theta,
                      jnp.zeros((n_users, width), jnp.float32),
                      jnp.zeros((n_items, width), jnp.float32))


def make_loss_fn(model):
    """`loss_fn(params, batch, features, graphs, scalars) -> (loss, (users, items, attention))`:
    BPR on the batch plus reg_weight * the L2 term over the full user and item matrices."""

    def loss_fn(params, batch: Batch, features, graphs, scalars: StepScalars):
        users, items, attention = model.apply({'params': params}, features, graphs,
                                              scalars.w1, scalars.w2)
        ranking = losses.bpr_loss(users[batch.users], items[batch.positives],
                                  items[batch.negatives], batch.weights)
        loss = ranking + scalars.reg_weight * losses.embedding_l2(users, items)
        return loss, (users, items, attention)

    return loss_fn


def apply_gradients(optimizer, params, opt_state, grads, learning_rate):
    """One optimiser update: params - learning_rate * Adam(grads). Returns (params, opt_state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state


def make_train_step(model, optimizer):
    """Returns the jitted `train_step(state, batch, features, graphs, scalars) -> (state, loss)`.

    The step is a pure function of its arguments; the batch is its only per-step input, so it
    can be sharded over devices by jitting with shardings, without changing this code.
    """
    loss_fn = make_loss_fn(model)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: Batch, features, graphs, scalars: StepScalars):
        (loss, (users, items, attention)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, features, graphs, scalars)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads,
                                            scalars.learning_rate)
        return TrainState(params, opt_state, attention, users, items), loss

    return train_step


def make_forward(model):
    @jax.jit
    def forward(params, features, graphs, w1, w2):
        return model.apply({'params': params}, features, graphs, w1, w2)
    return forward


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


def run_epoch(train_step, state: TrainState, batches: sampling.EpochBatches, features,
              graphs, scalars: StepScalars, epoch: int) -> tuple:
    """All batches of one epoch. Returns (state, summed loss); raises TrainingDiverged."""
    progress = reporting.BatchProgress(epoch, batches.users.shape[0])
    step_losses = []
    for b in range(batches.users.shape[0]):
        batch = Batch(*(jnp.asarray(a[b]) for a in batches))
        state, loss = train_step(state, batch, features, graphs, scalars)
        step_losses.append(loss)
        if progress.should_report(b):
            loss.block_until_ready()
            progress.report(b)
    step_losses = np.asarray(jnp.stack(step_losses))
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
        raise TrainingDiverged(f'training loss is {step_losses[bad[0]]} at epoch {epoch}, '
                               f'batch {bad[0]}')
    return state, float(step_losses.sum())


def early_stopping(progress: Progress, score: float, stopping_step: int) -> tuple:
    """The reference's rule: a strictly better (rounded) score resets the counter; the run stops
    when the counter exceeds `stopping_step`. Returns (improved, stop)."""
    if score > progress.best_valid_score:
        progress.best_valid_score, progress.stale_evaluations = score, 0
        return True, False
    progress.stale_evaluations += 1
    return False, progress.stale_evaluations > stopping_step


def _state_to_save(state: TrainState, key: jax.Array) -> dict:
    return {'params': state.params, 'opt_state': state.opt_state,
            'attention': state.attention, 'rng': jax.random.key_data(key)}


EVAL_EMBEDDINGS = ('last_batch', 'fresh')


def check_point_config(cfg, n_items: int) -> None:
    """Reject values that would otherwise fail late or silently (names the config field)."""
    metrics = [f'{m.lower()}@{k}' for m in cfg.eval.metrics for k in cfg.eval.topk]
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
    ]
    for ok, field, expected in checks:
        if not ok:
            section, name = field.split('.', 1)
            raise ValueError(f'config field {field} = {cfg[section].get(name)!r}; expected '
                             f'{expected}')


def train_and_evaluate(cfg, data: PreparedData, workdir: Path, *, resume: bool = False,
                       stop_after_epochs: Optional[int] = None) -> dict:
    """Train one grid point to early stopping; returns its result dict.

    Args:
      cfg: the point's config (scalar fields: `model`, `optim`, `train`, `eval`, `checkpoint`).
      data: shared dataset-derived inputs (`prepare_data`).
      workdir: this point's directory (checkpoints, metrics.jsonl).
      resume: continue from the latest checkpoint in `workdir` if there is one.
      stop_after_epochs: stop (as if interrupted) after this many epochs of this call; used to
        test resumption.
    """
    ds = data.dataset
    m, o, t, e = cfg.model, cfg.optim, cfg.train, cfg.eval
    metric = e.valid_metric.lower()
    check_point_config(cfg, ds.n_items)
    model = create_model(m, ds.n_users, ds.n_items)
    optimizer = optim.create_optimizer(float(o.weight_decay))
    item_graph = create_item_graph(data, int(m.knn_k), float(m.mm_image_weight))
    key = jax.random.PRNGKey(int(t.seed))
    init_key, dropout_key = jax.random.split(key)
    graphs0 = lirdrec.Graphs(data.norm_adj, item_graph)
    state = create_train_state(init_key, model, optimizer, data.features, graphs0)
    progress = Progress(epochs_done=0, w1=float(m.decay_weight), w2=1.0 - float(m.decay_weight))

    checkpoints = RunCheckpoints(workdir / 'ckpt', int(cfg.checkpoint.keep_last))
    if resume and checkpoints.latest_epoch() is not None:
        saved, saved_progress = checkpoints.restore(_state_to_save(state, key))
        state = state._replace(params=saved['params'], opt_state=saved['opt_state'],
                               attention=saved['attention'])
        progress = Progress(**saved_progress)
        reporting.log(f'resumed from {checkpoints.directory} after epoch '
                      f'{progress.epochs_done - 1}')

    train_step = make_train_step(model, optimizer)
    forward = make_forward(model) if e.embeddings == 'fresh' else None
    ks, metrics = tuple(e.topk), tuple(m_.lower() for m_ in e.metrics)
    epochs_this_call = 0
    while progress.epochs_done < int(t.epochs) and not progress.stopped_early:
        epoch = progress.epochs_done  # 0-based, as the reference logs it
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        # Start of epoch (the reference's pre_epoch_processing): PWC schedule and theta reset.
        w1, w2 = lirdrec.pwc_weights_for_epoch(progress.w1, progress.w2, epoch + 1,
                                               float(m.decay_base))
        state = state._replace(params=with_theta(state.params, state.attention))
        graphs = epoch_graphs(data, item_graph, float(m.dropout),
                              jax.random.fold_in(dropout_key, epoch), ds.n_users, ds.n_items)
        lr = optim.learning_rate_at(epoch, float(o.learning_rate), float(o.lr_decay_factor),
                                    float(o.lr_decay_epochs))
        scalars = StepScalars(*(jnp.float32(v) for v in (w1, w2, lr, float(m.reg_weight))))
        batches = sampling.epoch_batches(sampling.epoch_rng(int(t.seed), epoch), data.sampler,
                                         int(t.batch_size))
        state, loss = run_epoch(train_step, state, batches, data.features, graphs, scalars, epoch)
        train_seconds = time.perf_counter() - t0
        progress.w1, progress.w2 = w1, w2
        progress.epochs_done = epoch + 1
        record = {'epoch': epoch, 'loss': loss, 'learning_rate': lr, 'w1': w1, 'w2': w2,
                  'train_seconds': train_seconds}

        improved = False
        if (epoch + 1) % int(t.eval_step) == 0:
            t1 = time.perf_counter()
            if forward is None:
                user_emb, item_emb = state.user_emb, state.item_emb
            else:
                user_emb, item_emb, _ = forward(state.params, data.features, graphs,
                                                scalars.w1, scalars.w2)
            valid = evaluation.evaluate_full_sort(user_emb, item_emb, data.valid, metrics=metrics,
                                                  ks=ks, batch_size=int(e.batch_size))
            test = evaluation.evaluate_full_sort(user_emb, item_emb, data.test, metrics=metrics,
                                                 ks=ks, batch_size=int(e.batch_size))
            eval_seconds = time.perf_counter() - t1
            improved, stop = early_stopping(progress, valid[metric], int(t.stopping_step))
            if improved:
                progress.best_epoch, progress.best_valid, progress.best_test = epoch, valid, test
            progress.stopped_early = stop
            record.update(valid=valid, test=test, eval_seconds=eval_seconds)
            reporting.log(reporting.epoch_line(epoch, loss, train_seconds, eval_seconds, valid,
                                               test, improved, metric))
        else:
            reporting.log(f'epoch {epoch:4d}  loss {loss:.4f}  train {train_seconds:6.2f}s')
        progress.history.append(record)
        reporting.append_json_line(workdir / 'metrics.jsonl', record)
        checkpoints.save(progress.epochs_done, _state_to_save(state, key),
                         dataclasses.asdict(progress), improved)
        epochs_this_call += 1
        if progress.stopped_early:
            reporting.log(f'early stopping: no better valid {metric} for '
                          f'{t.stopping_step} evaluations; best epoch {progress.best_epoch}')
    checkpoints.close()
    finished = progress.stopped_early or progress.epochs_done >= int(t.epochs)
    return {'finished': finished, 'epochs_done': progress.epochs_done,
            'best_epoch': progress.best_epoch, 'best_valid': progress.best_valid,
            'best_test': progress.best_test, 'history': progress.history}
