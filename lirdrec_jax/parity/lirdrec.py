"""LIRDRec's parity against enoche/LIRDRec: build the reference and ours on the same data, copy
the weights, compare every quantity that determines the numbers, then train both on identical
batches.

Tolerances are float32 tolerances, justified in docs/parity.md.
"""
import copy
from typing import Callable, Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from lirdrec_jax import graph, optim, parallel, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import lirdrec
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import convert, reference
from lirdrec_jax.parity.common import (ReferenceSide, ReferenceTwins, adam_step_checks,
                                       benchmark_reference, compare_sparse, export_check, grads_by_reference_key,
                                       kink_tolerant_gradient_checks, knn_tie_rows,
                                       metric_floor_checks, modality_knn_cache, numpy_of,
                                       parameter_floor_checks,
                                       same_embedding_checks, torch_batch, torch_sparse_to_scipy)

# Tolerances (docs/parity.md explains each).
TOL_GRAPH = 1e-6          # absolute, on normalised graph entries (values <= 1)
TOL_DCT = 2e-5            # absolute, float32 FFT DCT vs float64 DCT of O(1)..O(10) features
TOL_EMB = 1e-5            # times max|ref|, on forward embeddings
TOL_ATT = 1e-5            # absolute, on softmax attention
TOL_LOSS = 1e-5           # relative, on a batch loss
TOL_GRAD = 1e-4           # times max|grad| of the parameter
TOL_STEP = 1e-3           # times the learning rate, on parameters after one Adam step
TOL_METRIC_SAME_EMB = 1e-4   # one unit of the 4-decimal rounding
# The training-trajectory quantities (epoch losses and metrics, theta at an epoch's start,
# parameters after the epochs) are judged against their measured noise floor instead
# (checks.floor_check): within checks.FLOOR_MULTIPLE times the floor, or the tolerance of the
# same quantity from identical inputs above (TOL_LOSS, TOL_METRIC_SAME_EMB, TOL_ATT; for
# parameters common.KINK_STEPS lr), whichever is larger.


# ----------------------------------------------------------------------------------------------
# LIRDRec's names in the reference, and the state it keeps outside its state_dict
# ----------------------------------------------------------------------------------------------

# reference key -> (our path, transpose)
PARAM_TABLE: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    'v_preference': (('image_preference',), False),
    't_preference': (('text_preference',), False),
    'id_preference': (('spectral_preference',), False),
}
for _ref, _ours in (('v', 'image'), ('t', 'text'), ('s', 'spectral')):
    PARAM_TABLE[f'{_ref}_MLP.weight'] = ((f'{_ours}_tower', 'hidden', 'kernel'), True)
    PARAM_TABLE[f'{_ref}_MLP.bias'] = ((f'{_ours}_tower', 'hidden', 'bias'), False)
    PARAM_TABLE[f'{_ref}_MLP_1.weight'] = ((f'{_ours}_tower', 'out', 'kernel'), True)
for _w in ('a', 'b', 'c'):
    for _layer in ('fc1', 'fc2'):
        PARAM_TABLE[f'fusion_module.weco_{_w}.{_layer}.weight'] = (
            ('fusion', f'weco_{_w}', _layer, 'kernel'), True)
        PARAM_TABLE[f'fusion_module.weco_{_w}.{_layer}.bias'] = (
            ('fusion', f'weco_{_w}', _layer, 'bias'), False)
PARAM_TABLE['fusion_module.theta'] = (('fusion', 'theta'), False)

# Trainable copies of the frozen features that the reference's forward pass never reads
# (docs/reference_quirks.md, D4).
FEATURE_KEYS = {'image_embedding.weight': 'image', 'text_embedding.weight': 'text'}


def state_dict_to_params(state_dict, template, features=None) -> dict:
    """`convert.state_dict_to_params` with LIRDRec's names."""
    return convert.state_dict_to_params(state_dict, template, features, table=PARAM_TABLE,
                                        feature_keys=FEATURE_KEYS)


def params_to_state_dict(params, features) -> dict:
    """`convert.params_to_state_dict` with LIRDRec's names."""
    return convert.params_to_state_dict(params, features, table=PARAM_TABLE,
                                        feature_keys=FEATURE_KEYS)


def adam_state_from_torch(optimizer_state, param_names, template) -> dict:
    """`convert.adam_state_from_torch` with LIRDRec's names."""
    return convert.adam_state_from_torch(optimizer_state, param_names, template,
                                         table=PARAM_TABLE, feature_keys=FEATURE_KEYS)


class ReferenceTrainingState(NamedTuple):
    """What the reference keeps outside its state_dict, as module attributes.

    Attributes:
      attention: (n_users, 3) `fusion_module.last_att`, copied into theta at the next epoch.
      w1, w2: `fusion_module.w1`, `fusion_module.w2`.
      epochs_started: `cur_epoch` (the reference increments it at the start of each epoch).
    """
    attention: np.ndarray
    w1: float
    w2: float
    epochs_started: int


def training_state_from_reference(model) -> ReferenceTrainingState:
    """The PWC state a live reference model keeps in attributes."""
    fusion = model.fusion_module
    return ReferenceTrainingState(convert.to_numpy(fusion.last_att), float(fusion.w1),
                                  float(fusion.w2),
                                  int(model.cur_epoch))


def reference_side(checkout) -> ReferenceSide:
    """The reference's own model and trainer, imported from the user's checkout."""
    ref = reference.load_reference(checkout, 'lirdrec', 'LIRDRec')
    return ReferenceSide(ref.Model, ref.Trainer)


def reference_model_config(point_cfg) -> dict:
    """LIRDRec's own keys of the reference's config dict (`reference.reference_config` adds the
    framework's), from one of our grid points (scalars)."""
    m, o = point_cfg.model, point_cfg.optim
    return {
        'model': 'LIRDRec', 'use_gpu': False,
        'embedding_size': m.embedding_size, 'feat_embed_dim': m.embedding_size,
        'knn_k': m.knn_k, 'lambda_coeff': 0.9, 'cf_model': None, 'n_mm_layers': m.n_mm_layers,
        'n_ui_layers': m.n_ui_layers, 'reg_weight': m.reg_weight,
        'mm_image_weight': m.mm_image_weight, 'dropout': m.dropout, 'degree_ratio': None,
        'decay_base': m.decay_base, 'decay_weight': m.decay_weight,
        'weight_decay': o.weight_decay,
    }


def run_reference_benchmark(checkout, dataset: MMRecDataset, args, point_cfg) -> dict:
    """The benchmark's `--reference` (bench.py): the reference timed on the same data, phase by
    phase (`common.benchmark_reference`: with `args.batches` its first N batches per epoch).
    Its kNN graph comes from a dense n_items x n_items similarity; where that does not fit,
    ours is written to its cache file `mm_adj_lirdrec_{knn_k}_{int(10 * mm_image_weight)}.pt`
    (`args.reference_graph`)."""
    return benchmark_reference(checkout, dataset, args, point_cfg, 'lirdrec', 'LIRDRec',
                               'enoche/LIRDRec',
                               graph_cache=modality_knn_cache('mm_adj_lirdrec', point_cfg))


def _our_params_by_reference_key(params, dataset: MMRecDataset) -> dict:
    features = {'image': dataset.image_feat, 'text': dataset.text_feat}
    return params_to_state_dict(jax.tree.map(np.asarray, params), features)


def run_parity(side: ReferenceSide, point_cfg, dataset: MMRecDataset, dataset_dir,
               *, epochs: int = 3, seed: int = 0,
               log: Callable[[str], None] = print) -> List[C.Check]:
    """All parity checks for one grid point; returns the checks (see `checks.report`)."""
    m, o = point_cfg.model, point_cfg.optim
    results: List[C.Check] = []
    log('building the reference model ...')
    ref_model, ref_cfg, staging = reference.build_reference_model(
        None, point_cfg, dataset, dataset_dir, seed=seed, model_class=side.model_class)
    prepared = train.prepare_data(dataset, 'lirdrec')

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
    frozen = lirdrec.Frozen(prepared.model.features, prepared.model.user_item, item_graph)
    results.append(C.compare('DCT view features', prepared.model.features.spectral,
                             numpy_of(ref_model.interleaved_feat), atol=TOL_DCT))

    # Weights.
    model = lirdrec.create(m, dataset.n_users, dataset.n_items)
    optimizer = optim.create_optimizer(float(o.weight_decay))
    template, _ = lirdrec.init(jax.random.PRNGKey(seed), model, frozen, frozen)
    params = state_dict_to_params(
        {k: numpy_of(v) for k, v in ref_model.state_dict().items()}, template,
        features={'image': dataset.image_feat, 'text': dataset.text_feat})
    params = jax.tree.map(jnp.asarray, params)
    # Export: our params as a state_dict that the reference model loads with strict=True.
    exported = params_to_state_dict(jax.tree.map(np.asarray, params),
                                            {'image': dataset.image_feat, 'text': dataset.text_feat})
    results.append(export_check(ref_model, exported))

    # The train step donates its input state: each phase gets its own copy of the weights.
    fresh = lambda: jax.tree.map(jnp.array, params)
    results += _single_step_checks(side, copy.deepcopy(ref_model), ref_cfg, model, optimizer,
                                   fresh(), prepared, frozen, point_cfg, seed, log)
    if float(m.dropout) > 0:
        results.append(C.Check('training epochs', float('nan'), float('nan'), 'skipped', True,
                               'dropout > 0 draws different edges on each side'))
    else:
        results += _training_checks(side, ref_model, ref_cfg, model, optimizer, fresh(),
                                    prepared, frozen, point_cfg, epochs, seed, log)
    staging.cleanup()
    return results


def _single_step_checks(side, ref_model, ref_cfg, model, optimizer, params, prepared, frozen,
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
    ref_att = numpy_of(ref_model.fusion_module.last_att)
    graphs = lirdrec.Graphs(frozen.user_item, frozen.item_item)
    users, items, att = model.apply({'params': params}, frozen.features, graphs, w1, w2)
    out.append(C.compare('forward: user embeddings', users, numpy_of(ref_u), atol=TOL_EMB,
                         scale_atol_by_ref_max=True))
    out.append(C.compare('forward: item embeddings', items, numpy_of(ref_i), atol=TOL_EMB,
                         scale_atol_by_ref_max=True))
    out.append(C.compare('forward: PWC attention', att, ref_att, atol=TOL_ATT))

    # Loss and gradients on the first batch of epoch 0.
    batches = sampling.epoch_batches(sampling.epoch_rng(seed, 0), prepared.sampler,
                                     int(point_cfg.train.batch_size))
    ref_batch = torch_batch(batches, 0)
    trainer = side.make_trainer(ref_cfg, ref_model)
    trainer.optimizer.zero_grad()
    ref_loss = ref_model.calculate_loss(ref_batch)
    ref_loss.backward()
    ref_grads = grads_by_reference_key(ref_model)
    batch = sampling.EpochBatches(*(jnp.asarray(a[0]) for a in batches))
    scalars = train.device_scalars({'w1': w1, 'w2': w2, 'reg_weight': float(m.reg_weight),
                                    'learning_rate': float(o.learning_rate)})
    carry = lirdrec.init(jax.random.PRNGKey(0), model, frozen, frozen)[1]
    (loss, batch_carry), grads = jax.value_and_grad(train.make_loss_fn(lirdrec.MODEL, model),
                                                    has_aux=True)(
        params, carry, batch, frozen, None, scalars, None)
    batch_att = batch_carry.attention
    out.append(C.compare('loss on one batch', float(loss), ref_loss.item(), atol=0,
                         rtol=TOL_LOSS))
    our_grads = _our_params_by_reference_key(grads, ds)
    out += kink_tolerant_gradient_checks(ref_grads, our_grads, ref_grads, TOL_GRAD, ref_model,
                                         lambda model: model.calculate_loss(ref_batch))

    # One Adam step from the same parameters, each side with the gradients compared above.
    trainer.optimizer.step()
    after, _ = train.apply_gradients(optimizer, params, optimizer.init(params), grads,
                                     jnp.float32(o.learning_rate))
    ours_after = _our_params_by_reference_key(after, ds)
    ref_params = dict(ref_model.named_parameters())
    out += adam_step_checks(ref_params, our_grads, ref_grads, ours_after, ref_params,
                            float(o.learning_rate), TOL_STEP)

    # Epoch boundary right after that step: w1/w2 of epoch 2, and theta overwritten with the
    # attention of the last forward (this batch's, computed before the step) while Adam's
    # moments are kept. Compared here, from identical parameters, the overwrite is exact; after
    # whole epochs the two float32 trajectories have drifted (see the training checks).
    ref_model.pre_epoch_processing()
    w1b, w2b = lirdrec.pwc_weights_for_epoch(w1, w2, 2, float(m.decay_base))
    out.append(C.compare('PWC w1, w2 at epoch 2', [w1b, w2b],
                         [ref_model.fusion_module.w1, ref_model.fusion_module.w2], atol=1e-12))
    theta = lirdrec.with_theta(after, batch_att)['fusion']['theta']
    out.append(C.compare('epoch boundary: theta <- last attention', theta,
                         numpy_of(ref_model.fusion_module.theta), atol=TOL_ATT))

    # Top-k lists and metrics from identical embeddings (the reference's forward above).
    ref_model.result_embed = torch.cat((ref_u, ref_i), 0)
    out += same_embedding_checks(trainer, numpy_of(ref_u), numpy_of(ref_i), prepared,
                                 point_cfg.eval, TOL_METRIC_SAME_EMB)
    return out


def _training_checks(side, ref_model, ref_cfg, model, optimizer, params, prepared, frozen,
                     point_cfg, epochs, seed, log) -> List[C.Check]:
    """Both sides trained on identical batches; every trajectory quantity is judged against
    its noise floor, the reference trained again from its weights moved one ulp."""
    m, t, e = point_cfg.model, point_cfg.train, point_cfg.eval
    out: List[C.Check] = []
    twins = ReferenceTwins(side, ref_model, ref_cfg)
    partitioner = parallel.Partitioner(num_devices=1)
    carry = lirdrec.init(jax.random.PRNGKey(0), model, frozen, frozen)[1]
    state = train.TrainState(params, optimizer.init(params),
                             carry._replace(attention=params['fusion']['theta']))
    key = jax.random.PRNGKey(seed)
    # The trainer's own set-up, with the imported weights and the reference's kNN graph.
    setup = train.setup_point(point_cfg, prepared, partitioner)._replace(
        net=model, optimizer=optimizer, frozen_host=frozen, frozen=frozen, state=state,
        key=key, epoch_key=key)
    fns = train.make_epoch_fns(setup, partitioner, 'last_batch')
    host = lirdrec.host_init(m)
    for epoch in range(epochs):
        log(f'training epoch {epoch} on both sides and the perturbed reference ...')
        twins.start_epoch()
        host, scalars = train.epoch_scalars(lirdrec.MODEL, point_cfg, host, epoch)
        w1, w2 = scalars['w1'], scalars['w2']
        state = fns.start_epoch(state, None)
        if epoch > 0:
            out.append(C.compare(f'epoch {epoch} start: PWC w1, w2', [w1, w2],
                                 [ref_model.fusion_module.w1, ref_model.fusion_module.w2],
                                 atol=1e-12))
            out.append(C.floor_check(f'epoch {epoch} start: theta (last attention)',
                                     state.params['fusion']['theta'],
                                     *twins.read(lambda model: model.fusion_module.theta),
                                     minimum=TOL_ATT))
        batches = sampling.epoch_batches(sampling.epoch_rng(seed, epoch), prepared.sampler,
                                         int(t.batch_size))
        ref_loss, perturbed_loss = twins.train_epoch(
            [torch_batch(batches, b) for b in range(batches.users.shape[0])], epoch)
        state, step_losses = train.run_epoch(fns, state, batches, frozen, None,
                                             train.device_scalars(scalars), key, None, epoch,
                                             partitioner, scan=False)
        loss = train.summed_loss(step_losses, epoch)
        out.append(C.floor_check(f'epoch {epoch}: summed training loss', loss, ref_loss,
                                 perturbed_loss, minimum=TOL_LOSS * abs(ref_loss)))
        out += metric_floor_checks(f'epoch {epoch}: ', twins, state.carry.user_emb,
                                   state.carry.item_emb, prepared, e, TOL_METRIC_SAME_EMB)
    ours_params = _our_params_by_reference_key(state.params, prepared.dataset)
    out += parameter_floor_checks(f'parameters after {epochs} epochs', ours_params, twins,
                                  PARAM_TABLE, float(point_cfg.optim.learning_rate))
    return out


# ----------------------------------------------------------------------------------------------
# End-to-end agreement (`--full`, lirdrec_jax/parity/full.py)
# ----------------------------------------------------------------------------------------------

def train_reference_to_early_stopping(side: ReferenceSide, point_cfg, dataset: MMRecDataset,
                                      dataset_dir, seed: int, make_loaders=None):
    """LIRDRec's reference trained to early stopping with its own random streams, seeded with
    `seed` as its quick_start seeds (`full.fit_reference`; `make_loaders` replaces the
    reference's data loaders in the tests). Returns a `full.RunOutcome`.

    Nothing LIRDRec-specific is needed: its PWC schedule and θ overwrite run in its own
    `pre_epoch_processing`, which `Trainer.fit` calls, and it scores with the last batch's
    embeddings, as our default `eval.embeddings = 'last_batch'` does.
    """
    from lirdrec_jax.parity import full
    return full.fit_reference(side, point_cfg, dataset, dataset_dir, seed, make_loaders)
