"""MLLMRec's parity against Yuzhuo-Dang/MLLMRec: build the reference and ours on the same data
(both read the same two input files), copy the weights, compare every quantity that determines
the numbers, then train both on identical batches.

The item graph: ours is built sparsely, the reference's densely; both are compared entry by
entry. Its top-k selections tie often (Jaccard values of sparse co-occurrences are small
fractions), and torch.topk orders ties arbitrarily, while ours takes the lower item index. Rows
where the choice is ambiguous (`graph_ambiguity`) are compared outside the tied entries only,
and every later quantity is computed from the REFERENCE's graph (imported), so that two
correct tie choices do not show up downstream.

Tolerances are float32 tolerances; each is justified where it is defined.
"""
import copy
from pathlib import Path
from typing import Callable, List, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from lirdrec_jax import graph, parallel, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import mllmrec
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import convert, reference
from lirdrec_jax.parity.common import (ReferenceSide, ReferenceTwins, adam_step_checks,
                                       built_reference, compare_sparse, export_check,
                                       gradient_checks, knn_tie_rows, metric_floor_checks,
                                       numpy_of, our_adam_step, parameter_floor_checks,
                                       same_embedding_checks, torch_batch, torch_sparse_to_scipy)

MODEL = mllmrec.MODEL
REFERENCE_REPO = 'Yuzhuo-Dang/MLLMRec'

# Absolute, on normalised graph entries (values <= 1): both sides compute D^-1/2 (B + J) D^-1/2
# from the same float32 Jaccard values; the reference in float32, we in float64 then rounded:
# a few float32 ulps.
TOL_GRAPH = 1e-6
# Relative: a cosine similarity within this of `pure`, or two within this of each other at the
# k-th place, may fall on either side in float32 (the two sides' products round differently,
# ~1e-7), so such rows are ambiguous.
TIE_REL = 1e-6
# Times max|ref|: e = F + S F, float32 sparse sums over ~knn_k + knn_jac terms on the
# reference's side, float64 on ours.
TOL_INPUTS = 1e-5
# Times max|ref|, on the towers' outputs: float32 products of width F_dim (384 with the no-LLM
# inputs) and 4 dim, summed in other orders (as for LIRDRec's towers).
TOL_EMB = 1e-5
TOL_LOSS = 1e-5           # relative, on a batch loss (a mean of log-sigmoids)
TOL_GRAD = 1e-4           # times max|grad| of the parameter (MLP_1.bias: see _gradient_checks)
TOL_STEP = 1e-3           # times the learning rate, on parameters after one Adam step
TOL_METRIC_SAME_EMB = 1e-4   # one unit of the 4-decimal rounding
# The training-trajectory quantities (epoch losses and metrics, parameters after the epochs)
# are judged against their measured noise floor instead (checks.floor_check), as for FREEDOM.

# reference state_dict key -> (our parameter path, transposed)
PARAM_TABLE = {}
for _ref, _ours in (('MLP', 'item_tower'), ('MLP_u', 'user_tower')):
    for _suffix, _layer in (('', 'hidden'), ('_1', 'out')):
        PARAM_TABLE[f'{_ref}{_suffix}.weight'] = ((_ours, _layer, 'kernel'), True)
        PARAM_TABLE[f'{_ref}{_suffix}.bias'] = ((_ours, _layer, 'bias'), False)
# The reference's frozen copies of the two input files (nn.Embedding.from_pretrained, not
# trained): our inputs, not parameters.
FEATURE_KEYS = {'item_feat_embedding.weight': 'items',
                'user_preference_feat_embedding.weight': 'users'}
# The item tower's output bias adds b.h_u to both scores of a BPR row: its gradient is 0 up to
# rounding (docs: quirk entry).
CANCELLING_BIAS = 'MLP_1.bias'


# ----------------------------------------------------------------------------------------------
# The reference side, its config keys, the name table
# ----------------------------------------------------------------------------------------------

def reference_side(checkout) -> ReferenceSide:
    """The reference's own model and trainer, imported from the user's checkout."""
    ref = reference.load_reference(checkout, 'mllmrec', 'MLLMRec', REFERENCE_REPO)
    return ReferenceSide(ref.Model, ref.Trainer)


def reference_model_config(point_cfg) -> dict:
    """MLLMRec's own keys of the reference's config dict (`reference.reference_config` adds the
    framework's), from one of our grid points (scalars): those its model constructor reads,
    and the names of the two input files, which its GeneralRecommender reads from the dataset
    folder. `n_ui_layers` is read but sizes only the commented-out user-item propagation; it
    gets the reference's 2. Its trainer also reads `req_training` (when not true, its epochs
    train nothing: overall.yaml sets True) and, unlike LIRDRec's, passes `weight_decay` to Adam
    (overall.yaml: 0.0, as ours). `alpha1`, `alpha2`, `beta` are read for a mode that its
    quick_start never enables; absent, as in its yaml files."""
    m, d = point_cfg.model, point_cfg.data
    return {
        'model': 'MLLMRec', 'feat_embed_dim': m.feat_embed_dim, 'n_ii_layers': m.n_ii_layers,
        'n_ui_layers': 2, 'knn_k': m.knn_k, 'knn_jac': m.knn_jac, 'pure': m.pure,
        'image_text_feature_file': d.image_text_file,
        'user_preference_feature_file': d.user_profile_file,
        'req_training': True, 'weight_decay': point_cfg.optim.weight_decay,
    }


def run_reference_benchmark(checkout, dataset: MMRecDataset, args, point_cfg) -> dict:
    """The benchmark's `--reference` (bench.py): the reference timed on the same data. Its two
    frozen input tables are registered parameters that never train: left out of the count."""
    return reference.run_reference_benchmark(
        checkout, dataset, args, point_cfg, 'mllmrec', 'MLLMRec', repository=REFERENCE_REPO,
        unused_parameters=tuple(k[:-len('weight')] for k in FEATURE_KEYS))


def import_state_dict(state_dict, template) -> dict:
    """The reference's state_dict (tensors or arrays) -> our params (numpy)."""
    return convert.state_dict_to_params(state_dict, template, table=PARAM_TABLE,
                                        feature_keys=FEATURE_KEYS)


def export_params(params, inputs=None) -> dict:
    """Our params -> a state_dict of numpy arrays; with `inputs` ({'items': F, 'users': P})
    the reference's frozen tables are filled too, so that it loads the result strictly."""
    return convert.params_to_state_dict(jax.tree.map(np.asarray, params), inputs,
                                        table=PARAM_TABLE,
                                        feature_keys=FEATURE_KEYS if inputs else {})


# ----------------------------------------------------------------------------------------------
# Where the item graph is ambiguous
# ----------------------------------------------------------------------------------------------

class GraphAmbiguity(NamedTuple):
    """Where two correct item graphs may differ.

    Attributes:
      whole_rows: rows of the cosine part B whose top-k boundary is a near-tie at or above pure,
        or with a top-k similarity within float32 rounding of pure: not compared at all.
      tie_rows: rows of the Jaccard part J whose knn_jac-th and (knn_jac+1)-th positive values
        are equal (exactly: both sides compute the same float32 values), so that which of the
        tied items are kept is the top-k's choice.
      tied: (n_items, n_items) CSR, 1 at the entries of the tie rows whose Jaccard value is the
        tied one: the entries either side may pick. Everything else of a tie row is determined.
    """
    whole_rows: np.ndarray
    tie_rows: np.ndarray
    tied: sp.csr_matrix


def _cosine_ambiguous_rows(features: np.ndarray, knn_k: int, pure: float) -> np.ndarray:
    n = features.shape[0]
    values, _ = graph.cosine_knn(features, min(knn_k + 1, n))
    top = values[:, :knn_k].astype(np.float64)
    near_pure = (np.abs(top - pure) <= TIE_REL * pure).any(axis=1)
    # A tie at the k-th place matters only when the k-th neighbour is an edge (>= pure).
    boundary = np.zeros(n, bool)
    boundary[knn_tie_rows(features, knn_k, rel=TIE_REL)] = True
    boundary &= top[:, -1] >= pure * (1 - TIE_REL)
    return np.flatnonzero(near_pure | boundary)


def _jaccard_ties(prepared: mllmrec.Prepared, knn_jac: int) -> tuple:
    """(tie rows, tied entries) of J (`GraphAmbiguity`), from the untruncated Jaccard rows."""
    rows_out, tied_rows, tied_cols = [], [], []
    for start, block in mllmrec.jaccard_blocks(prepared.train_users, prepared.train_items,
                                               prepared.n_users, prepared.n_items):
        coo = block.tocoo()
        order = np.lexsort((coo.col, -coo.data, coo.row))
        rows, cols, vals = coo.row[order], coo.col[order], coo.data[order]
        starts = np.searchsorted(rows, np.arange(block.shape[0]))
        counts = np.diff(np.append(starts, rows.size))
        has_next = counts > knn_jac
        kth = np.full(block.shape[0], np.nan)
        nxt = np.full(block.shape[0], np.nan)
        kth[has_next] = vals[starts[has_next] + knn_jac - 1]
        nxt[has_next] = vals[starts[has_next] + knn_jac]
        tie = has_next & (kth == nxt)
        entry_tied = tie[rows] & (vals == kth[rows])
        rows_out.append(np.flatnonzero(tie) + start)
        tied_rows.append(rows[entry_tied] + start)
        tied_cols.append(cols[entry_tied])
    n = prepared.n_items
    r, c = np.concatenate(rows_out or [[]]), np.concatenate(tied_cols or [[]])
    tied = sp.csr_matrix((np.ones(c.size), (np.concatenate(tied_rows or [[]]), c)),
                         shape=(n, n))
    return r.astype(np.int64), tied


def graph_ambiguity(prepared: mllmrec.Prepared, knn_k: int, knn_jac: int,
                    pure: float) -> GraphAmbiguity:
    """The rows and entries where a tie decides the item graph (see `GraphAmbiguity`)."""
    tie_rows, tied = _jaccard_ties(prepared, knn_jac)
    return GraphAmbiguity(_cosine_ambiguous_rows(prepared.items, knn_k, pure), tie_rows, tied)


def graph_checks(ours: sp.spmatrix, ref: sp.spmatrix, amb: GraphAmbiguity) -> List[C.Check]:
    """S entry by entry: every row that no tie decides (structure and values), then the Jaccard
    tie rows outside their tied entries (the entries a tie cannot change: B's edges, the
    Jaccard neighbours above the tied value, and, since the picked values are the same
    whichever items carry them, the row's degree and so every value)."""
    allowed = np.union1d(amb.whole_rows, amb.tie_rows)
    out = compare_sparse('item graph S', ours, ref, TOL_GRAPH, allowed_rows=allowed)
    rows = np.setdiff1d(amb.tie_rows, amb.whole_rows)
    keep = sp.diags(np.isin(np.arange(ours.shape[0]), rows).astype(np.float64))

    def untied(m):
        m = sp.csr_matrix(keep @ sp.csr_matrix(m))
        m = m - m.multiply(amb.tied)
        m = sp.csr_matrix(m)
        m.eliminate_zeros()
        return m

    out += [c._replace(name=c.name.replace('item graph S', 'item graph S, tie rows outside the '
                                                           'tied entries'),
                       note=f'{rows.size} tie rows, {int(amb.tied.nnz)} tied entries; '
                            + c.note)
            for c in compare_sparse('item graph S', untied(ours), untied(ref), TOL_GRAPH)]
    return out


# ----------------------------------------------------------------------------------------------
# Our side's compiled pieces
# ----------------------------------------------------------------------------------------------

_eval_embeddings = jax.jit(lambda net, params, frozen: MODEL.eval_embeddings(
    net, params, (), frozen, None, {}, 'fresh'), static_argnums=0)


def _loss_and_grads_fn(net):
    loss_fn = train.make_loss_fn(MODEL, net)

    @jax.jit
    def run(params, batch, frozen):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, (), batch, frozen, None, {}, None)
        return loss, grads
    return run


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------

def run_parity(side: ReferenceSide, point_cfg, dataset: MMRecDataset, dataset_dir,
               *, epochs: int = 3, seed: int = 0,
               log: Callable[[str], None] = print) -> List[C.Check]:
    """All parity checks for one grid point; returns the checks (see `checks.report`)."""
    import torch
    m = point_cfg.model
    results: List[C.Check] = []
    with built_reference(side, point_cfg, dataset, dataset_dir, seed, log) as (ref_model, ref_cfg):
        prepared = train.prepare_data(dataset, MODEL.name)
        ours = prepared.model
        state = {k: numpy_of(v) for k, v in ref_model.state_dict().items()}
        # Both sides must have read the same two files.
        results.append(C.exact('item input F = reference item_feat_embedding', ours.items,
                               state['item_feat_embedding.weight']))
        results.append(C.exact('user input P = reference user_preference_feat_embedding',
                               ours.users, state['user_preference_feat_embedding.weight']))

        log('comparing the item graph ...')
        knn_k, knn_jac, pure = int(m.knn_k), int(m.knn_jac), float(m.pure)
        our_graph = mllmrec.point_item_graph(ours, m)
        ref_graph = torch_sparse_to_scipy(ref_model.ii_mat)
        amb = graph_ambiguity(ours, knn_k, knn_jac, pure)
        results += graph_checks(our_graph, ref_graph, amb)

        # e: ours from the reference's graph (what every later check uses), and from our own
        # graph on the rows that no tie decides (with one layer e_i reads row i of S only).
        n_layers = int(m.n_ii_layers)
        with torch.no_grad():
            ref_e = numpy_of(ref_model.II_GCN(ref_model.ii_mat,
                                              ref_model.item_feat_embedding.weight))
        e = mllmrec.item_inputs(ref_graph, ours.items, n_layers)
        results.append(C.compare("item inputs e, from the reference's graph", e, ref_e,
                                 atol=TOL_INPUTS, scale_atol_by_ref_max=True))
        if n_layers <= 1:
            decided = ~np.isin(np.arange(dataset.n_items),
                               np.union1d(amb.whole_rows, amb.tie_rows))
            own = mllmrec.item_inputs(our_graph, ours.items, n_layers)
            results.append(C.compare('item inputs e, from our graph (rows no tie decides)',
                                     own, ref_e, atol=TOL_INPUTS, scale_atol_by_ref_max=True,
                                     mask=np.broadcast_to(decided[:, None], own.shape),
                                     note=f'{int(decided.sum())} of {decided.size} rows'))

        # Weights.
        net = MODEL.create(m, dataset.n_users, dataset.n_items)
        frozen_host = mllmrec.Frozen(e, ours.users)
        frozen = MODEL.place_frozen(frozen_host, parallel.Partitioner(num_devices=1), None)
        template, _ = MODEL.init(jax.random.PRNGKey(seed), net, frozen, frozen_host)
        params = jax.tree.map(jnp.asarray, import_state_dict(state, template))
        exported = export_params(params, {'items': ours.items, 'users': ours.users})
        results.append(export_check(ref_model, exported))

        fresh = lambda: jax.tree.map(jnp.array, params)
        results += _single_step_checks(side, copy.deepcopy(ref_model), ref_cfg, net, fresh(),
                                       prepared, frozen, point_cfg, seed, log)
        if epochs > 0:
            results += _training_checks(side, ref_model, ref_cfg, net, fresh(), prepared,
                                        frozen_host, point_cfg, epochs, seed, log)
    return results


def _reference_forward(ref_model):
    import torch
    with torch.no_grad():
        users, items = ref_model.forward(getattr(ref_model, 'norm_adj', None))
    return numpy_of(users), numpy_of(items)


def _single_step_checks(side, ref_model, ref_cfg, net, params, prepared, frozen, point_cfg,
                        seed, log) -> List[C.Check]:
    o = point_cfg.optim
    out: List[C.Check] = []
    log('comparing the forward pass, loss, gradients, one Adam step ...')
    ref_u, ref_i = _reference_forward(ref_model)
    users, items = _eval_embeddings(net, params, frozen)
    out.append(C.compare('forward: user embeddings h_u', users, ref_u, atol=TOL_EMB,
                         scale_atol_by_ref_max=True))
    out.append(C.compare('forward: item embeddings h_i', items, ref_i, atol=TOL_EMB,
                         scale_atol_by_ref_max=True))

    # Loss and gradients on the first batch of epoch 0.
    ref_model.pre_epoch_processing()
    batches = sampling.batch_kind(MODEL.batch_kind).draw(
        sampling.epoch_rng(seed, 0), prepared.sampler, int(point_cfg.train.batch_size))
    trainer = side.make_trainer(ref_cfg, ref_model)
    trainer.optimizer.zero_grad()
    ref_loss = ref_model.calculate_loss(torch_batch(batches, 0))
    ref_loss.backward()
    ref_grads = {k: numpy_of(p.grad) for k, p in ref_model.named_parameters()
                 if p.grad is not None}
    batch = sampling.EpochBatches(*(jnp.asarray(a[0]) for a in batches))
    loss, grads = _loss_and_grads_fn(net)(params, batch, frozen)
    out.append(C.compare('loss on one batch', float(loss), ref_loss.item(), atol=0,
                         rtol=TOL_LOSS))
    our_grads = export_params(grads)
    real = np.asarray(batch.weights) > 0
    bias_scale = float(np.abs(np.asarray(users)[np.asarray(batch.users)[real]]).max())
    out += _gradient_checks(our_grads, ref_grads, bias_scale)

    # One Adam step from the same parameters, each side with the gradients compared above.
    trainer.optimizer.step()
    ours_after = export_params(our_adam_step(params, grads, o.weight_decay, o.learning_rate))
    # MLP_1.bias's gradients are rounding noise on both sides: the implied term is its whole
    # allowance.
    out += adam_step_checks(PARAM_TABLE, our_grads, ref_grads, ours_after,
                            dict(ref_model.named_parameters()), float(o.learning_rate), TOL_STEP)

    # Top-k lists and metrics from identical embeddings: the reference's evaluator scores with
    # a fresh forward (its full_sort_predict); ours ranks that same forward's embeddings.
    eval_u, eval_i = _reference_forward(ref_model)
    out += same_embedding_checks(trainer, eval_u, eval_i, prepared, point_cfg.eval,
                                 TOL_METRIC_SAME_EMB)
    return out


def _gradient_checks(our_grads: dict, ref_grads: dict, bias_scale: float) -> List[C.Check]:
    """One check per parameter of ours (every one must have a reference gradient).

    The item tower's output bias b adds b.h_u to the positive AND the negative score of every
    row: it cancels in the margin, its exact gradient is 0 and both sides hold rounding noise,
    so a bound relative to its own (noise) maximum means nothing. It is bounded by TOL_GRAD
    times the scale of the terms that cancel (each a batch mean of sigmoid(.) * h_u, at most
    max|h_u| over the batch's users).
    """
    return gradient_checks(PARAM_TABLE, our_grads, ref_grads, TOL_GRAD, (CANCELLING_BIAS,),
                           bias_scale, 'max|h_u batch|')


def _training_checks(side, ref_model, ref_cfg, net, params, prepared, frozen_host, point_cfg,
                     epochs, seed, log) -> List[C.Check]:
    """Both sides trained on identical batches; every trajectory quantity is judged against its
    noise floor, the reference trained again from its weights moved one ulp, on the same
    batches."""
    t, e = point_cfg.train, point_cfg.eval
    out: List[C.Check] = []
    twins = ReferenceTwins(side, ref_model, ref_cfg)
    partitioner = parallel.Partitioner(num_devices=1)
    # The trainer's own set-up of the point (its speed options), with the imported weights and
    # the e of the reference's graph.
    setup = train.setup_point(point_cfg, prepared, partitioner, frozen_host=frozen_host)
    state = train.TrainState(params, setup.optimizer.init(params), setup.state.carry)
    key = jax.random.PRNGKey(seed)
    setup = setup._replace(net=net, state=state, key=key, epoch_key=key)
    fns = train.make_epoch_fns(setup, partitioner, 'last_batch')
    host = MODEL.host_init(point_cfg.model)
    for epoch in range(epochs):
        log(f'training epoch {epoch} on both sides and the perturbed reference ...')
        twins.start_epoch()
        host, scalars = train.epoch_scalars(MODEL, point_cfg, host, epoch)
        state = fns.start_epoch(state, None)
        batches = sampling.batch_kind(MODEL.batch_kind).draw(
            sampling.epoch_rng(seed, epoch), prepared.sampler, int(t.batch_size))
        ref_loss, perturbed_loss = twins.train_epoch(
            [torch_batch(batches, b) for b in range(batches.users.shape[0])], epoch)
        sc = train.device_scalars(scalars)
        state, step_losses = train.run_epoch(fns, state, batches, setup.frozen, None, sc, key,
                                             None, epoch, partitioner, setup.options.scan_epoch)
        loss = train.summed_loss(step_losses, epoch)
        out.append(C.floor_check(f'epoch {epoch}: summed training loss', loss, ref_loss,
                                 perturbed_loss, minimum=TOL_LOSS * abs(ref_loss)))
        users, items = fns.eval_embeddings(state.params, state.carry, setup.frozen, None, sc)
        out += metric_floor_checks(f'epoch {epoch}: ', twins, users, items, prepared, e,
                                   TOL_METRIC_SAME_EMB)
    out += parameter_floor_checks(f'parameters after {epochs} epochs',
                                  export_params(state.params), twins, PARAM_TABLE,
                                  float(point_cfg.optim.learning_rate))
    return out


# ----------------------------------------------------------------------------------------------
# End-to-end agreement (`--full`, lirdrec_jax/parity/full.py)
# ----------------------------------------------------------------------------------------------

def train_reference_to_early_stopping(side: ReferenceSide, point_cfg, dataset: MMRecDataset,
                                      dataset_dir, seed: int, make_loaders=None):
    """MLLMRec's reference trained to early stopping with its own random streams, seeded with
    `seed` as its quick_start seeds (`full.fit_reference`). Returns a `full.RunOutcome`.

    Its two input files are linked into the staging folder before the model is built (when
    the loaders are made, which `fit_reference` does first)."""
    from lirdrec_jax.parity import full
    make = make_loaders or reference.reference_loaders
    names = tuple(reference.input_file_names(point_cfg).values())

    def loaders(config, ds):
        reference.link_files(Path(dataset_dir), Path(config['data_path'] + config['dataset']),
                             names)
        return make(config, ds)

    return full.fit_reference(side, point_cfg, dataset, dataset_dir, seed, loaders)
