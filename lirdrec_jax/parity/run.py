"""The parity procedure: build the reference and ours on the same data, copy the weights,
compare every quantity that determines the numbers, then train both on identical batches.

Tolerances are float32 tolerances, justified in docs/parity.md.
"""
import copy
from typing import Callable, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

from lirdrec_jax import evaluation, graph, optim, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import lirdrec
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import convert, reference

# Tolerances (docs/parity.md explains each).
TOL_GRAPH = 1e-6          # absolute, on normalised graph entries (values <= 1)
TOL_DCT = 2e-5            # absolute, float32 FFT DCT vs float64 DCT of O(1)..O(10) features
TOL_EMB = 1e-5            # times max|ref|, on forward embeddings
TOL_ATT = 1e-5            # absolute, on softmax attention
TOL_LOSS = 1e-5           # relative, on a batch loss
TOL_GRAD = 1e-4           # times max|grad| of the parameter
TOL_STEP = 1e-3           # times the learning rate, on parameters after one Adam step
# Two float32 training runs drift apart: an element whose gradient is at rounding-noise level
# gets Adam steps of up to ~(1-b1)/sqrt(1-b2) = 3.16 lr in a direction set by the noise, on each
# side. After steps with learning rates summing to S, elements can differ by up to 2*3.16*S.
ADAM_DRIFT = 6.4
TOL_EPOCH_LOSS = 1e-3     # relative, on an epoch's summed loss after several epochs
TOL_METRIC_SAME_EMB = 1e-4   # one unit of the 4-decimal rounding
TOL_METRIC_TRAINED = 5e-3    # after independent float32 training on both sides


class ReferenceSide(NamedTuple):
    """The PyTorch side: the model class and a trainer factory with the reference's interface
    (`trainer.optimizer`, `trainer.lr_scheduler.step()`, `trainer._train_epoch(batches, epoch)`,
    `trainer.evaluate(eval_data)`, `trainer.evaluator.evaluate(topk_list, eval_data)`)."""
    model_class: type
    make_trainer: Callable


def reference_side(checkout) -> ReferenceSide:
    """The reference's own model and trainer, imported from the user's checkout."""
    ref = reference.load_reference(checkout)
    return ReferenceSide(ref.LIRDRec, ref.Trainer)


def torch_sparse_to_scipy(tensor) -> sp.csr_matrix:
    t = tensor.coalesce()
    idx = t.indices().numpy()
    return sp.csr_matrix((t.values().double().numpy(), (idx[0], idx[1])), shape=tuple(t.shape))


def compare_sparse(name: str, ours: sp.spmatrix, ref: sp.spmatrix, atol: float,
                   allowed_rows: Optional[np.ndarray] = None) -> List[C.Check]:
    """Structure (which entries exist) and values of two sparse matrices."""
    ours, ref = sp.csr_matrix(ours), sp.csr_matrix(ref)
    ours.sum_duplicates(), ref.sum_duplicates()
    pattern_diff = (abs(ours.sign()) - abs(ref.sign())).tocsr()
    pattern_diff.eliminate_zeros()
    rows = np.unique(pattern_diff.tocoo().row)
    note = f'{ref.nnz} entries'
    if allowed_rows is not None:
        unexplained = np.setdiff1d(rows, allowed_rows)
        note += f', {rows.size} rows differ, all among {allowed_rows.size} rows with tied neighbours' \
            if unexplained.size == 0 else f', {unexplained.size} rows differ without ties'
        structure_ok = unexplained.size == 0
    else:
        structure_ok = rows.size == 0
        note += f', {rows.size} rows differ' if rows.size else ''
    structure = C.Check(f'{name}: structure', float(rows.size), 0.0, 'same entries'
                        + (' (ties excepted)' if allowed_rows is not None else ''), structure_ok,
                        note)
    same_rows = np.setdiff1d(np.arange(ref.shape[0]), rows)
    diff = abs(ours[same_rows] - ref[same_rows])
    max_abs = float(diff.max()) if diff.nnz else 0.0
    rel = diff.multiply(abs(ref[same_rows]).power(-1).tocsr().multiply(abs(ref[same_rows]) > 0))
    values = C.Check(f'{name}: values', max_abs, float(rel.max()) if rel.nnz else 0.0,
                     f'|d| <= {atol:g}', max_abs <= atol)
    return [structure, values]


def knn_tie_rows(features: np.ndarray, k: int, rel: float = 1e-6, block: int = 2048) -> np.ndarray:
    """Rows whose k-th and (k+1)-th cosine similarities are within `rel`: their top-k set is
    ambiguous in float32, so two correct implementations may pick different neighbours."""
    x = np.asarray(features, np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for start in range(0, unit.shape[0], block):
        sim = unit[start:start + block] @ unit.T
        top = -np.sort(-np.partition(-sim, k, axis=1)[:, :k + 1], axis=1)
        gap = top[:, k - 1] - top[:, k]
        out.append(np.flatnonzero(gap <= rel * np.maximum(np.abs(top[:, k - 1]), 1e-12)) + start)
    return np.concatenate(out)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _grads_by_reference_key(model) -> dict:
    return {k: _numpy(p.grad) for k, p in model.named_parameters() if p.grad is not None}


def _our_params_by_reference_key(params, dataset: MMRecDataset) -> dict:
    features = {'image': dataset.image_feat, 'text': dataset.text_feat}
    return convert.params_to_state_dict(jax.tree.map(np.asarray, params), features)


def _torch_batch(batches: sampling.EpochBatches, b: int):
    import torch
    real = batches.weights[b] > 0
    return torch.from_numpy(np.stack([batches.users[b][real], batches.positives[b][real],
                                      batches.negatives[b][real]]).astype(np.int64))


class _TopkCapture:
    """Wraps the reference evaluator to keep the top-k lists it is given."""

    def __init__(self, trainer):
        self.trainer, self.lists = trainer, None
        self._inner = trainer.evaluator.evaluate
        trainer.evaluator.evaluate = self

    def __call__(self, batch_matrix_list, eval_data, *args, **kwargs):
        import torch
        self.lists = torch.cat(batch_matrix_list, 0).numpy()
        return self._inner(batch_matrix_list, eval_data, *args, **kwargs)


def run_parity(side: ReferenceSide, point_cfg, dataset: MMRecDataset, dataset_dir,
               *, epochs: int = 3, seed: int = 0,
               log: Callable[[str], None] = print) -> List[C.Check]:
    """All parity checks for one grid point; returns the checks (see `checks.report`)."""
    import torch
    m, o = point_cfg.model, point_cfg.optim
    results: List[C.Check] = []
    log('building the reference model ...')
    ref_model, ref_cfg, staging = reference.build_reference_model(
        None, point_cfg, dataset, dataset_dir, seed=seed, model_class=side.model_class)
    prepared = train.prepare_data(dataset)

    # Graphs.
    log('comparing graphs ...')
    our_adj = graph.norm_adjacency_scipy(dataset.train.users, dataset.train.items,
                                         dataset.n_users, dataset.n_items).astype(np.float32)
    results += compare_sparse('user-item adjacency', our_adj,
                              torch_sparse_to_scipy(ref_model.norm_adj), TOL_GRAPH)
    feats = [f for f in (dataset.image_feat, dataset.text_feat) if f is not None]
    weights = graph.modality_weights(dataset.image_feat is not None,
                                     dataset.text_feat is not None, float(m.mm_image_weight))
    ties = np.unique(np.concatenate([knn_tie_rows(f, int(m.knn_k)) for f in feats]))
    ref_knn = torch_sparse_to_scipy(ref_model.mm_adj)
    results += compare_sparse('item-item kNN graph',
                              graph.knn_item_graph_scipy(feats, weights, int(m.knn_k)),
                              ref_knn, TOL_GRAPH, allowed_rows=ties)
    # Downstream checks use the reference's kNN graph, so that tied neighbour choices (both
    # correct) do not show up as differences in every later quantity.
    item_graph = jsparse.BCOO.from_scipy_sparse(ref_knn.astype(np.float32))
    graphs = lirdrec.Graphs(prepared.norm_adj, item_graph)
    results.append(C.compare('DCT view features', prepared.features.spectral,
                             _numpy(ref_model.interleaved_feat), atol=TOL_DCT))

    # Weights.
    model = train.create_model(m, dataset.n_users, dataset.n_items)
    optimizer = optim.create_optimizer(float(o.weight_decay))
    template = train.create_train_state(jax.random.PRNGKey(seed), model, optimizer,
                                        prepared.features, graphs).params
    params = convert.state_dict_to_params(
        {k: _numpy(v) for k, v in ref_model.state_dict().items()}, template,
        features={'image': dataset.image_feat, 'text': dataset.text_feat})
    params = jax.tree.map(jnp.asarray, params)
    # Export: our params as a state_dict that the reference model loads with strict=True.
    exported = convert.params_to_state_dict(jax.tree.map(np.asarray, params),
                                            {'image': dataset.image_feat, 'text': dataset.text_feat})
    probe = copy.deepcopy(ref_model)
    probe.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    results.append(C.exact('export: state_dict loaded by the reference (strict)',
                           np.concatenate([_numpy(v).ravel() for v in probe.state_dict().values()]),
                           np.concatenate([_numpy(v).ravel()
                                           for v in ref_model.state_dict().values()])))
    del probe

    # The train step donates its input state: each phase gets its own copy of the weights.
    fresh = lambda: jax.tree.map(jnp.array, params)
    results += _single_step_checks(side, copy.deepcopy(ref_model), ref_cfg, model, optimizer,
                                   fresh(), prepared, graphs, point_cfg, seed, log)
    if float(m.dropout) > 0:
        results.append(C.Check('training epochs', float('nan'), float('nan'), 'skipped', True,
                               'dropout > 0 draws different edges on each side'))
    else:
        results += _training_checks(side, ref_model, ref_cfg, model, optimizer, fresh(),
                                    prepared, graphs, point_cfg, epochs, seed, log)
    staging.cleanup()
    return results


def _single_step_checks(side, ref_model, ref_cfg, model, optimizer, params, prepared, graphs,
                        point_cfg, seed, log) -> List[C.Check]:
    import torch
    m, o = point_cfg.model, point_cfg.optim
    ds = prepared.dataset
    out: List[C.Check] = []
    log('comparing forward pass, loss, gradients, one Adam step ...')
    ref_model.pre_epoch_processing()
    w1, w2 = lirdrec.pwc_weights_for_epoch(float(m.decay_weight), 1 - float(m.decay_weight), 1,
                                           float(m.decay_base))
    out.append(C.compare('PWC w1, w2 at epoch 1', [w1, w2],
                         [ref_model.fusion_module.w1, ref_model.fusion_module.w2], atol=1e-12))
    with torch.no_grad():
        ref_u, ref_i = ref_model.forward(ref_model.masked_adj)
    ref_att = _numpy(ref_model.fusion_module.last_att)
    users, items, att = model.apply({'params': params}, prepared.features, graphs, w1, w2)
    out.append(C.compare('forward: user embeddings', users, _numpy(ref_u), atol=TOL_EMB,
                         scale_atol_by_ref_max=True))
    out.append(C.compare('forward: item embeddings', items, _numpy(ref_i), atol=TOL_EMB,
                         scale_atol_by_ref_max=True))
    out.append(C.compare('forward: PWC attention', att, ref_att, atol=TOL_ATT))

    # Loss and gradients on the first batch of epoch 0.
    batches = sampling.epoch_batches(sampling.epoch_rng(seed, 0), prepared.sampler,
                                     int(point_cfg.train.batch_size))
    ref_batch = _torch_batch(batches, 0)
    trainer = side.make_trainer(ref_cfg, ref_model)
    trainer.optimizer.zero_grad()
    ref_loss = ref_model.calculate_loss(ref_batch)
    ref_loss.backward()
    ref_grads = _grads_by_reference_key(ref_model)
    batch = train.Batch(*(jnp.asarray(a[0]) for a in batches))
    scalars = train.StepScalars(*(jnp.float32(v) for v in
                                  (w1, w2, float(o.learning_rate), float(m.reg_weight))))
    (loss, (_, _, batch_att)), grads = jax.value_and_grad(train.make_loss_fn(model),
                                                          has_aux=True)(
        params, batch, prepared.features, graphs, scalars)
    out.append(C.compare('loss on one batch', float(loss), ref_loss.item(), atol=0,
                         rtol=TOL_LOSS))
    our_grads = _our_params_by_reference_key(grads, ds)
    for key, g in ref_grads.items():
        out.append(C.compare(f'gradient {key}', our_grads[key], g, atol=TOL_GRAD,
                             scale_atol_by_ref_max=True))

    # One Adam step from the same parameters, each side with the gradients compared above.
    trainer.optimizer.step()
    after, _ = train.apply_gradients(optimizer, params, optimizer.init(params), grads,
                                     jnp.float32(o.learning_rate))
    ours_after = _our_params_by_reference_key(after, ds)
    lr = float(o.learning_rate)
    for key, p in ref_model.named_parameters():
        if key not in ref_grads:
            continue
        # Adam's first step moves each element by lr * g / (|g| + eps). Each side uses its own
        # gradient (compared above), so the allowed difference is the difference that the two
        # gradients imply, plus float32 rounding of the parameter and 1e-3 lr.
        u_ours = our_grads[key] / (np.abs(our_grads[key]) + 1e-8)
        u_ref = ref_grads[key] / (np.abs(ref_grads[key]) + 1e-8)
        p_ref = _numpy(p)
        bound = TOL_STEP * lr + lr * np.abs(u_ours - u_ref) + 2.0 ** -22 * np.abs(p_ref)
        out.append(C.within_bound(f'after one Adam step {key}', ours_after[key], p_ref, bound,
                                  f'|d| <= {TOL_STEP:g} lr + implied'))

    # Epoch boundary right after that step: w1/w2 of epoch 2, and theta overwritten with the
    # attention of the last forward (this batch's, computed before the step) while Adam's
    # moments are kept. Compared here, from identical parameters, the overwrite is exact; after
    # whole epochs the two float32 trajectories have drifted (see the training checks).
    ref_model.pre_epoch_processing()
    w1b, w2b = lirdrec.pwc_weights_for_epoch(w1, w2, 2, float(m.decay_base))
    out.append(C.compare('PWC w1, w2 at epoch 2', [w1b, w2b],
                         [ref_model.fusion_module.w1, ref_model.fusion_module.w2], atol=1e-12))
    theta = train.with_theta(after, batch_att)['fusion']['theta']
    out.append(C.compare('epoch boundary: theta <- last attention', theta,
                         _numpy(ref_model.fusion_module.theta), atol=TOL_ATT))

    # Top-k lists and metrics from identical embeddings (the reference's forward above).
    capture = _TopkCapture(trainer)
    ref_model.result_embed = torch.cat((ref_u, ref_i), 0)
    for name, split in (('valid', prepared.valid), ('test', prepared.test)):
        ref_metrics = trainer.evaluate(reference.ReferenceEvalData(split,
                                                                   int(point_cfg.eval.batch_size)))
        ours_topk = evaluation.full_sort_topk(_numpy(ref_u), _numpy(ref_i), split,
                                              k=max(point_cfg.eval.topk))
        ours_metrics = evaluation.topk_metrics(evaluation.hit_matrix(ours_topk, split),
                                               split.pos_len, metrics=point_cfg.eval.metrics,
                                               ks=point_cfg.eval.topk)
        out.append(_topk_check(f'{name} top-{ours_topk.shape[1]} lists', ours_topk, capture.lists,
                               _numpy(ref_u)[split.users], _numpy(ref_i)))
        out.append(C.metrics_check(f'{name} metrics, same embeddings', ours_metrics,
                                   {k.lower(): v for k, v in ref_metrics.items()},
                                   atol=TOL_METRIC_SAME_EMB))
    return out


def _topk_check(name, ours, ref, users, items) -> C.Check:
    """Identical lists, except where two items' scores are within float32 rounding."""
    differ = np.flatnonzero((ours != ref).any(axis=1))
    unexplained = 0
    for row in differ:
        col = int(np.flatnonzero(ours[row] != ref[row])[0])
        s = items @ users[row].astype(np.float64)
        a, b = s[ours[row, col]], s[ref[row, col]]
        if abs(a - b) > 1e-5 * max(abs(a), abs(b), 1e-12):
            unexplained += 1
    return C.Check(name, float(differ.size), 0.0, 'equal up to float32 ties', unexplained == 0,
                   f'{differ.size} of {ours.shape[0]} lists differ'
                   + (f', {unexplained} not explained by near-equal scores' if unexplained
                      else (', all at near-equal scores' if differ.size else '')))


def _training_checks(side, ref_model, ref_cfg, model, optimizer, params, prepared, graphs,
                     point_cfg, epochs, seed, log) -> List[C.Check]:
    m, o, t, e = point_cfg.model, point_cfg.optim, point_cfg.train, point_cfg.eval
    out: List[C.Check] = []
    trainer = side.make_trainer(ref_cfg, ref_model)
    state = train.TrainState(params, optimizer.init(params), params['fusion']['theta'],
                             jnp.zeros((prepared.dataset.n_users, 3 * model.dim)),
                             jnp.zeros((prepared.dataset.n_items, 3 * model.dim)))
    step = train.make_train_step(model, optimizer)
    w1, w2 = float(m.decay_weight), 1.0 - float(m.decay_weight)
    metrics, ks = tuple(e.metrics), tuple(e.topk)
    lr_sum = 0.0  # sum of the learning rates of all steps so far
    for epoch in range(epochs):
        log(f'training epoch {epoch} on both sides ...')
        ref_model.pre_epoch_processing()
        w1, w2 = lirdrec.pwc_weights_for_epoch(w1, w2, epoch + 1, float(m.decay_base))
        state = state._replace(params=train.with_theta(state.params, state.attention))
        if epoch > 0:
            out.append(C.compare(f'epoch {epoch} start: PWC w1, w2', [w1, w2],
                                 [ref_model.fusion_module.w1, ref_model.fusion_module.w2],
                                 atol=1e-12))
            out.append(C.compare(f'epoch {epoch} start: theta (last attention)',
                                 state.params['fusion']['theta'],
                                 _numpy(ref_model.fusion_module.theta),
                                 atol=ADAM_DRIFT * lr_sum, note='trajectory drift'))
        batches = sampling.epoch_batches(sampling.epoch_rng(seed, epoch), prepared.sampler,
                                         int(t.batch_size))
        ref_loss, _ = trainer._train_epoch([_torch_batch(batches, b)
                                            for b in range(batches.users.shape[0])], epoch)
        trainer.lr_scheduler.step()
        lr = optim.learning_rate_at(epoch, float(o.learning_rate), float(o.lr_decay_factor),
                                    float(o.lr_decay_epochs))
        scalars = train.StepScalars(*(jnp.float32(v) for v in (w1, w2, lr, float(m.reg_weight))))
        state, loss = train.run_epoch(step, state, batches, prepared.features, graphs, scalars,
                                      epoch)
        lr_sum += lr * batches.users.shape[0]
        out.append(C.compare(f'epoch {epoch}: summed training loss', loss, float(ref_loss),
                             atol=0, rtol=TOL_EPOCH_LOSS))
        for name, split in (('valid', prepared.valid), ('test', prepared.test)):
            ref_metrics = trainer.evaluate(reference.ReferenceEvalData(split, int(e.batch_size)))
            ours = evaluation.evaluate_full_sort(state.user_emb, state.item_emb, split,
                                                 metrics=metrics, ks=ks)
            out.append(C.metrics_check(f'epoch {epoch}: {name} metrics', ours,
                                       {k.lower(): v for k, v in ref_metrics.items()},
                                       atol=TOL_METRIC_TRAINED))
    ours_params = _our_params_by_reference_key(state.params, prepared.dataset)
    worst = max((float(np.abs(ours_params[k] - _numpy(p)).max()), k)
                for k, p in ref_model.named_parameters() if k in convert.PARAM_TABLE)
    out.append(C.Check(f'parameters after {epochs} epochs', worst[0], 0.0,
                       f'|d| <= {ADAM_DRIFT:g} * sum(lr)', worst[0] <= ADAM_DRIFT * lr_sum,
                       f'trajectory drift, worst: {worst[1]}'))
    return out
