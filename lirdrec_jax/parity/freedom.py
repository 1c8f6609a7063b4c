"""FREEDOM's parity against enoche/FREEDOM: build the reference and ours on the same data, copy
the weights, compare every quantity that determines the numbers, then train both on identical
batches and identical pruned graphs.

The pruned graph of an epoch is a weighted draw without replacement (`torch.multinomial` on the
reference's side, a Gumbel top-k on ours): two correct implementations only agree in
distribution. So the reference's draw is IMPORTED: after its `pre_epoch_processing()` its
masked adjacency is read, the kept training edges are recovered from its entries, and our
pruned adjacency is rebuilt from exactly those edges by our own renormalisation (the function
our epoch inputs use), then compared value by value and used for our side of that epoch.

Tolerances are float32 tolerances, justified in docs/parity.md (FREEDOM section).
"""
import copy
import functools
from typing import Callable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

from lirdrec_jax import graph, parallel, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import freedom
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import convert, reference
from lirdrec_jax.parity.common import (ReferenceSide, ReferenceTwins, adam_step_checks,
                                       benchmark_reference, built_reference, compare_sparse,
                                       export_check, gradient_checks, imported_trainer,
                                       knn_tie_rows, metric_floor_checks, modality_knn_cache,
                                       numpy_of, our_adam_step,
                                       parameter_floor_checks, same_embedding_checks, torch_batch,
                                       torch_sparse_to_scipy)

MODEL = freedom.MODEL
REFERENCE_REPO = 'enoche/FREEDOM'

# Tolerances (docs/parity.md explains each).
TOL_GRAPH = 1e-6          # absolute, on normalised graph entries (values <= 1)
TOL_EDGE_WEIGHT = 1e-6    # relative, on the sampling weights 1/sqrt(d_u d_i) (float32 both sides)
TOL_EMB = 1e-5            # times max|ref|, on forward embeddings
TOL_LOSS = 1e-5           # relative, on a batch loss
TOL_GRAD = 1e-4           # times max|grad| of the parameter (the bias: see _gradient_checks)
TOL_STEP = 1e-3           # times the learning rate, on parameters after one Adam step
TOL_METRIC_SAME_EMB = 1e-4   # one unit of the 4-decimal rounding
# The training-trajectory quantities (epoch losses and metrics, parameters after the epochs) are
# judged against their measured noise floor instead (checks.floor_check): within
# checks.FLOOR_MULTIPLE times the floor, or the tolerance of the same quantity from identical
# inputs above (TOL_LOSS, TOL_METRIC_SAME_EMB; for parameters common.KINK_STEPS lr), whichever
# is larger.


# ----------------------------------------------------------------------------------------------
# The reference side, its config keys, the name table
# ----------------------------------------------------------------------------------------------

def reference_side(checkout) -> ReferenceSide:
    """The reference's own model and trainer, imported from the user's checkout."""
    ref = reference.load_reference(checkout, 'freedom', 'FREEDOM', REFERENCE_REPO)
    return ReferenceSide(ref.Model, ref.Trainer)


def reference_model_config(point_cfg) -> dict:
    """FREEDOM's own keys of the reference's config dict (exactly those its constructor reads;
    `reference.reference_config` adds the framework's), from one of our grid points (scalars).

    `lambda_coeff`, `cf_model` and `degree_ratio` are read but never used (quirk M7); they get
    FREEDOM.yaml's values (0.9; the other two are not in it, so the reference's Config gives
    None). One field of ours sizes both `embedding_size` and `feat_embed_dim` (M6).
    """
    m = point_cfg.model
    return {
        'model': 'FREEDOM',
        'embedding_size': m.embedding_size, 'feat_embed_dim': m.embedding_size,
        'knn_k': m.knn_k, 'lambda_coeff': 0.9, 'cf_model': None, 'n_mm_layers': m.n_mm_layers,
        'n_ui_layers': m.n_ui_layers, 'reg_weight': m.reg_weight,
        'mm_image_weight': m.mm_image_weight, 'dropout': m.dropout, 'degree_ratio': None,
    }


def run_reference_benchmark(checkout, dataset: MMRecDataset, args, point_cfg) -> dict:
    """The benchmark's `--reference` (bench.py): the reference timed on the same data, phase by
    phase (`common.benchmark_reference`: with `args.batches` its first N batches per epoch).
    Its feature tables are trained parameters (quirk M2), so every parameter counts. Its kNN
    graph comes from a dense n_items x n_items similarity; where that does not fit, ours is
    written to its cache file `mm_adj_freedomdsp_{knn_k}_{int(10 * mm_image_weight)}.pt`
    (`args.reference_graph`)."""
    return benchmark_reference(checkout, dataset, args, point_cfg, 'freedom', 'FREEDOM',
                               REFERENCE_REPO, unused_parameters=(),
                               graph_cache=modality_knn_cache('mm_adj_freedomdsp', point_cfg))


def modalities_of(dataset: MMRecDataset) -> Tuple[str, ...]:
    """The modalities the dataset has features for (the reference builds a projection and a
    trainable table for exactly these)."""
    return tuple(m for m, f in (('image', dataset.image_feat), ('text', dataset.text_feat))
                 if f is not None)


def param_table(modalities) -> dict:
    """FREEDOM's name table: reference state_dict key -> (our parameter path, transposed).
    Our names are the reference's; nn.Linear weights are our transposed kernels."""
    table = {'user_embedding.weight': (('user_embedding',), False),
             'item_id_embedding.weight': (('item_id_embedding',), False)}
    for m in modalities:
        table[f'{m}_embedding.weight'] = ((f'{m}_embedding',), False)
        table[f'{m}_trs.weight'] = ((f'{m}_trs', 'kernel'), True)
        table[f'{m}_trs.bias'] = ((f'{m}_trs', 'bias'), False)
    return table


def import_state_dict(state_dict, template, table) -> dict:
    """The reference's state_dict (tensors or arrays) -> our params (numpy)."""
    return convert.state_dict_to_params(state_dict, template, table=table, feature_keys={})


def export_params(params, table) -> dict:
    """Our params -> a state_dict of numpy arrays that the reference loads (strict=True)."""
    return convert.params_to_state_dict(jax.tree.map(np.asarray, params), None, table=table,
                                        feature_keys={})


# ----------------------------------------------------------------------------------------------
# Graph helpers
# ----------------------------------------------------------------------------------------------

def bcoo_to_scipy(matrix: jsparse.BCOO) -> sp.csr_matrix:
    """A BCOO matrix (repeated entries summed, as the sparse product does) in float64 CSR."""
    idx = np.asarray(matrix.indices)
    out = sp.coo_matrix((np.asarray(matrix.data, np.float64), (idx[:, 0], idx[:, 1])),
                        shape=matrix.shape).tocsr()
    out.sum_duplicates()
    return out


def kept_edges(masked_adj, n_users: int) -> Tuple[np.ndarray, np.ndarray]:
    """The training edges an epoch kept, read back from the reference's masked adjacency: its
    (user, n_users + item) entries, read raw (the reference's tensor is not coalesced)."""
    idx = masked_adj._indices().numpy()
    upper = (idx[0] < n_users) & (idx[1] >= n_users)
    return idx[0, upper].astype(np.int32), (idx[1, upper] - n_users).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _rebuild(edges: graph.TrainEdges, n_kept: int, n_users: int, n_items: int):
    # Keeping all n of n edges draws every one of them: the same function our epoch inputs use
    # (`freedom.epoch_inputs`) then renormalises them with their own degrees and mirrors them.
    return graph.edge_dropout_adjacency(jax.random.PRNGKey(0), edges, n_kept, n_users, n_items)


def pruned_adjacency_from(users: np.ndarray, items: np.ndarray, n_users: int,
                          n_items: int) -> jsparse.BCOO:
    """Our pruned adjacency of exactly these kept edges (our renormalisation)."""
    edges = graph.TrainEdges(jnp.asarray(users, jnp.int32), jnp.asarray(items, jnp.int32),
                             jnp.ones(users.shape, jnp.float32))
    return _rebuild(edges, int(users.size), n_users, n_items)


def _edge_checks(edges: graph.TrainEdges, ref_indices: np.ndarray, ref_values: np.ndarray
                 ) -> List[C.Check]:
    """The edges the pruning draws from and their sampling weights, as multisets.

    The order is not compared: a draw is a set of edges, and the reference's order is not the
    training rows' (its `inter_matrix().astype(np.float32)` sorts the COO matrix by (user,
    item), SciPy's astype summing duplicates). Both lists are sorted by (user, item) first.
    """
    users, items = np.asarray(edges.users), np.asarray(edges.items)
    ours_order = np.lexsort((items, users))
    ref_order = np.lexsort((ref_indices[1], ref_indices[0]))
    ours_pairs = np.stack([users[ours_order], items[ours_order]])
    ref_pairs = ref_indices[:, ref_order]
    same = ours_pairs.shape == ref_pairs.shape and bool(np.array_equal(ours_pairs, ref_pairs))
    out = [C.exact('pruning: edge multiset', ours_pairs, ref_pairs,
                   f'{ref_pairs.shape[1]} edges on its side, {ours_pairs.shape[1]} on ours')]
    if same:
        out.append(C.compare('pruning: sampling weights 1/sqrt(d_u d_i)',
                             np.asarray(edges.weights)[ours_order], ref_values[ref_order],
                             atol=0, rtol=TOL_EDGE_WEIGHT))
    else:
        out.append(C.Check('pruning: sampling weights 1/sqrt(d_u d_i)', float('nan'),
                           float('nan'), 'same edges', False, 'the edge lists differ'))
    return out


def _kept_edges_check(name: str, users, items, train_users, train_items, n_items: int,
                      expected: int) -> C.Check:
    """The number of kept edges is the reference's truncated count, and every kept pair is a
    training pair (kept at most as often as it occurs in training)."""
    kept_keys, kept_counts = np.unique(users.astype(np.int64) * n_items + items,
                                       return_counts=True)
    train_keys, train_counts = np.unique(train_users.astype(np.int64) * n_items + train_items,
                                         return_counts=True)
    pos = np.searchsorted(train_keys, kept_keys)
    pos = np.minimum(pos, train_keys.size - 1)
    known = train_keys[pos] == kept_keys
    within = known & (kept_counts <= train_counts[pos])
    ok = users.size == expected and bool(within.all())
    note = (f'{users.size} kept of {train_users.size} (ours keeps {expected})'
            + ('' if within.all() else f', {int((~within).sum())} pairs are not training pairs'))
    return C.Check(name, float(abs(users.size - expected)), 0.0,
                   'count equal, all training pairs', ok, note)


# ----------------------------------------------------------------------------------------------
# Our side's compiled pieces
# ----------------------------------------------------------------------------------------------

_forward = jax.jit(freedom.forward, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(net, params, batch, frozen, epoch_in, scalars):
    loss_fn = train.make_loss_fn(MODEL, net)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, (), batch, frozen, epoch_in, scalars, None)
    return loss, grads


def _flat(params, table) -> dict:
    """Our params (or gradients) by reference key, in the reference's layout."""
    return export_params(params, table)


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------

def run_parity(side: ReferenceSide, point_cfg, dataset: MMRecDataset, dataset_dir,
               *, epochs: int = 3, seed: int = 0,
               log: Callable[[str], None] = print) -> List[C.Check]:
    """All parity checks for one grid point; returns the checks (see `checks.report`)."""
    m = point_cfg.model
    results: List[C.Check] = []
    with built_reference(side, point_cfg, dataset, dataset_dir, seed, log) as (ref_model, ref_cfg):
        prepared = train.prepare_data(dataset, MODEL.name)
        ours = prepared.model
        table = param_table(modalities_of(dataset))

        # Graphs.
        log('comparing graphs ...')
        results += compare_sparse('user-item adjacency', bcoo_to_scipy(ours.user_item),
                                  torch_sparse_to_scipy(ref_model.norm_adj), TOL_GRAPH)
        feats = [f for f in (ours.image, ours.text) if f is not None]
        ties = np.unique(np.concatenate([knn_tie_rows(f, int(m.knn_k)) for f in feats]))
        ref_knn = torch_sparse_to_scipy(ref_model.mm_adj)
        our_knn = freedom.item_graph(ours, int(m.knn_k), float(m.mm_image_weight))
        results += compare_sparse('item-item kNN graph', bcoo_to_scipy(our_knn), ref_knn,
                                  TOL_GRAPH, allowed_rows=ties)
        # Downstream checks use the reference's kNN graph, so that tied neighbour choices (both
        # correct) do not show up as differences in every later quantity.
        item_graph = jsparse.BCOO.from_scipy_sparse(ref_knn.astype(np.float32))
        results += _edge_checks(ours.edges, numpy_of(ref_model.edge_indices),
                                numpy_of(ref_model.edge_values))

        # Weights.
        net = MODEL.create(m, dataset.n_users, dataset.n_items)
        frozen_host = freedom.Frozen(ours.user_item, item_graph, ours.image, ours.text)
        template, _ = MODEL.init(jax.random.PRNGKey(seed), net, frozen_host, frozen_host)
        params = import_state_dict({k: numpy_of(v) for k, v in ref_model.state_dict().items()},
                                   template, table)
        for mod in modalities_of(dataset):
            # FREEDOM's feature tables are parameters initialised from the data: both sides
            # must have read the same features.
            results.append(C.exact(f'initial {mod}_embedding.weight = our {mod} features',
                                   params[f'{mod}_embedding'], getattr(ours, mod)))
        params = jax.tree.map(jnp.asarray, params)
        exported = export_params(params, table)
        results.append(export_check(ref_model, exported))

        frozen = MODEL.place_frozen(frozen_host, parallel.Partitioner(num_devices=1),
                                    train.RunOptions())
        # The train step donates its input state: each phase gets its own copy of the weights.
        fresh = lambda: jax.tree.map(jnp.array, params)
        results += _single_step_checks(side, copy.deepcopy(ref_model), ref_cfg, net, fresh(),
                                       prepared, frozen, table, point_cfg, seed, log)
        if epochs > 0:
            results += _training_checks(side, ref_model, ref_cfg, net, fresh(), prepared,
                                        frozen_host, table, point_cfg, epochs, seed, log)
    return results


def _epoch_graph(ref_model, prepared, point_cfg, prefix: str, suffix: str) -> tuple:
    """After the reference's `pre_epoch_processing()`: our training graph of the epoch built
    from its kept edges (None with dropout 0: the full adjacency, as on its side), and the
    checks of that graph, named '<prefix>pruned adjacency<suffix>...'. Returns (epoch input or
    None, checks)."""
    m, ours = point_cfg.model, prepared.model
    n_users, n_items = prepared.dataset.n_users, prepared.dataset.n_items
    ref_masked = torch_sparse_to_scipy(ref_model.masked_adj)
    if float(m.dropout) <= 0.0:
        ours_none = MODEL.epoch_inputs(ours, m, jax.random.PRNGKey(0), 0) is None
        out = compare_sparse(f'{prefix}training graph (dropout 0: the full adjacency)',
                             bcoo_to_scipy(ours.user_item), ref_masked, TOL_GRAPH)
        out[0] = out[0]._replace(passed=out[0].passed and ours_none)
        return None, out
    name = f'{prefix}pruned adjacency{suffix}'
    users, items = kept_edges(ref_model.masked_adj, n_users)
    train_users, train_items = np.asarray(ours.edges.users), np.asarray(ours.edges.items)
    out = [_kept_edges_check(f'{name}: kept edges', users, items, train_users, train_items,
                             n_items, freedom.keep_count(train_users.size, float(m.dropout)))]
    pruned = pruned_adjacency_from(users, items, n_users, n_items)
    out += compare_sparse(name, bcoo_to_scipy(pruned), ref_masked, TOL_GRAPH)
    return pruned, out


def _bias_keys(table) -> List[str]:
    return [k for k in table if k.endswith('_trs.bias')]


def _single_step_checks(side, ref_model, ref_cfg, net, params, prepared, frozen, table,
                        point_cfg, seed, log) -> List[C.Check]:
    import torch
    m, o = point_cfg.model, point_cfg.optim
    out: List[C.Check] = []
    log('comparing forward passes, the pruned graph, loss, gradients, one Adam step ...')
    # Forward on the full graph (what evaluation scores with).
    with torch.no_grad():
        ref_u, ref_i = ref_model.forward(ref_model.norm_adj)
    users, items = _forward(net, params, frozen.user_item, frozen.item_item)
    out.append(C.compare('forward, full graph: user embeddings', users, numpy_of(ref_u),
                         atol=TOL_EMB, scale_atol_by_ref_max=True))
    out.append(C.compare('forward, full graph: item embeddings', items, numpy_of(ref_i),
                         atol=TOL_EMB, scale_atol_by_ref_max=True))

    # The pruned graph of an epoch: the reference's draw, imported.
    ref_model.pre_epoch_processing()
    pruned, graph_checks = _epoch_graph(ref_model, prepared, point_cfg, '', ' (epoch 0 draw)')
    out += graph_checks
    train_graph = frozen.user_item if pruned is None else pruned
    with torch.no_grad():
        ref_pu, ref_pi = ref_model.forward(ref_model.masked_adj)
    p_users, p_items = _forward(net, params, train_graph, frozen.item_item)
    out.append(C.compare('forward, pruned graph: user embeddings', p_users, numpy_of(ref_pu),
                         atol=TOL_EMB, scale_atol_by_ref_max=True))
    out.append(C.compare('forward, pruned graph: item embeddings', p_items, numpy_of(ref_pi),
                         atol=TOL_EMB, scale_atol_by_ref_max=True))

    # Loss and gradients on the first batch of epoch 0, on that pruned graph.
    batches = sampling.batch_kind(MODEL.batch_kind).draw(
        sampling.epoch_rng(seed, 0), prepared.sampler, int(point_cfg.train.batch_size))
    ref_batch = torch_batch(batches, 0)
    trainer = side.make_trainer(ref_cfg, ref_model)
    trainer.optimizer.zero_grad()
    ref_loss = ref_model.calculate_loss(ref_batch)
    ref_loss.backward()
    ref_grads = {k: numpy_of(p.grad) for k, p in ref_model.named_parameters()
                 if p.grad is not None}
    batch = sampling.EpochBatches(*(jnp.asarray(a[0]) for a in batches))
    scalars = train.device_scalars({'reg_weight': float(m.reg_weight),
                                    'learning_rate': float(o.learning_rate)})
    loss, grads = _loss_and_grads(net, params, batch, frozen, pruned, scalars)
    out.append(C.compare('loss on one batch', float(loss), ref_loss.item(), atol=0,
                         rtol=TOL_LOSS))
    our_grads = _flat(grads, table)
    real = np.asarray(batch.weights) > 0
    bias_scale = float(m.reg_weight) * float(
        np.abs(np.asarray(p_users)[np.asarray(batch.users)[real]]).max())
    out += _gradient_checks(our_grads, ref_grads, table, bias_scale)

    # One Adam step from the same parameters, each side with the gradients compared above.
    trainer.optimizer.step()
    ours_after = _flat(our_adam_step(params, grads, o.weight_decay, o.learning_rate), table)
    # The projection biases' gradients are rounding noise: the implied term is their whole
    # allowance (docs/parity.md).
    out += adam_step_checks(table, our_grads, ref_grads, ours_after,
                            dict(ref_model.named_parameters()), float(o.learning_rate), TOL_STEP)

    # Top-k lists and metrics from identical embeddings: the reference's evaluator scores with
    # a fresh forward on the full graph (its full_sort_predict); ours ranks that same forward's
    # embeddings.
    with torch.no_grad():
        eval_u, eval_i = ref_model.forward(ref_model.norm_adj)
    eval_u, eval_i = numpy_of(eval_u), numpy_of(eval_i)
    out += same_embedding_checks(trainer, eval_u, eval_i, prepared, point_cfg.eval,
                                 TOL_METRIC_SAME_EMB)
    return out


def _gradient_checks(our_grads: dict, ref_grads: dict, table, bias_scale: float
                     ) -> List[C.Check]:
    """One check per parameter of ours (every one must have a reference gradient).

    The projection biases cancel in every BPR margin u.(Wp + b) - u.(Wn + b) (quirk M5): their
    exact gradient is 0 and both sides hold rounding noise, so a bound relative to their own
    (noise) scale means nothing. They are bounded instead by TOL_GRAD times the scale of the
    terms that cancel: each is a batch mean of reg_weight * sigmoid(.) * u, at most
    reg_weight * max|u| over the batch's users.
    """
    return gradient_checks(table, our_grads, ref_grads, TOL_GRAD, set(_bias_keys(table)),
                           bias_scale, 'reg_weight * max|u_batch|')


def _training_checks(side, ref_model, ref_cfg, net, params, prepared, frozen_host, table,
                     point_cfg, epochs, seed, log) -> List[C.Check]:
    """Both sides trained on identical batches and graphs; every trajectory quantity is judged
    against its noise floor, the reference trained again from its weights moved one ulp, on
    the same batches and the same drawn graphs."""
    m, t, e = point_cfg.model, point_cfg.train, point_cfg.eval
    out: List[C.Check] = []
    twins = ReferenceTwins(side, ref_model, ref_cfg)
    # The trainer's own set-up, with the imported weights and the reference's kNN graph.
    setup, fns, partitioner = imported_trainer(MODEL, point_cfg, prepared, net, params,
                                               frozen_host, seed)
    options, frozen, state, key = setup.options, setup.frozen, setup.state, setup.key
    host = MODEL.host_init(m)
    for epoch in range(epochs):
        log(f'training epoch {epoch} on both sides and the perturbed reference ...')
        same_graph = twins.start_epoch()
        pruned, graph_checks = _epoch_graph(ref_model, prepared, point_cfg, f'epoch {epoch}: ',
                                            '')
        out += graph_checks
        if float(m.dropout) > 0:
            # Otherwise the floor would include a different graph, not float32 noise.
            out.append(C.Check(f'epoch {epoch}: perturbed reference drew the same graph',
                               float(not same_graph), 0.0, 'same masked adjacency',
                               same_graph))
        epoch_in = train.place_epoch_inputs(partitioner, pruned, options)
        host, scalars = train.epoch_scalars(MODEL, point_cfg, host, epoch)
        state = fns.start_epoch(state, None)
        batches = sampling.batch_kind(MODEL.batch_kind).draw(
            sampling.epoch_rng(seed, epoch), prepared.sampler, int(t.batch_size))
        ref_loss, perturbed_loss = twins.train_epoch(
            [torch_batch(batches, b) for b in range(batches.users.shape[0])], epoch)
        sc = train.device_scalars(scalars)
        state, step_losses = train.run_epoch(fns, state, batches, frozen, epoch_in, sc, key,
                                             None, epoch, partitioner, options.scan_epoch)
        loss = train.summed_loss(step_losses, epoch)
        out.append(C.floor_check(f'epoch {epoch}: summed training loss', loss, ref_loss,
                                 perturbed_loss, minimum=TOL_LOSS * abs(ref_loss)))
        users, items = fns.eval_embeddings(state.params, state.carry, frozen, epoch_in, sc)
        out += metric_floor_checks(f'epoch {epoch}: ', twins, users, items, prepared, e,
                                   TOL_METRIC_SAME_EMB)
    out += parameter_floor_checks(f'parameters after {epochs} epochs', _flat(state.params, table),
                                  twins, table, float(point_cfg.optim.learning_rate))
    return out


# ----------------------------------------------------------------------------------------------
# End-to-end agreement (`--full`, lirdrec_jax/parity/full.py)
# ----------------------------------------------------------------------------------------------

def train_reference_to_early_stopping(side: ReferenceSide, point_cfg, dataset: MMRecDataset,
                                      dataset_dir, seed: int, make_loaders=None):
    """FREEDOM's reference trained to early stopping with its own random streams, seeded with
    `seed` as its quick_start seeds (`full.fit_reference`; `make_loaders` replaces the
    reference's data loaders in the tests). Returns a `full.RunOutcome`.

    Its pruned graph is drawn by its own `pre_epoch_processing` (`torch.multinomial` on torch's
    global generator, seeded here), not imported as in the step-by-step checks: in this mode
    each side draws its own graphs, like everything else.
    """
    from lirdrec_jax.parity import full
    return full.fit_reference(side, point_cfg, dataset, dataset_dir, seed, make_loaders)
