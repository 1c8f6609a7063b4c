"""CM3's parity against enoche/CM3: build the reference and ours on the same data, copy the
weights, compare every quantity that determines the numbers, then train both on identical
batches with identical random mixing weights.

Two things are done in our process to the imported reference, never to the checkout:
- **It runs on a CPU** (`with_cpu_shim`). As published, CM3 runs only on CUDA: its constructor
  registers `result_embed = nn.Parameter(...).to(device)`, which on a CPU stays a registered
  Parameter (on CUDA `.to` returns a plain tensor), and its forward pass then assigns a tensor
  to that name, which torch refuses for a registered Parameter. The shim unregisters it after
  construction and keeps it as a plain attribute, exactly what it is on CUDA (and so, as on
  CUDA, it is not in the optimiser).
- **Its Beta draws are imported** (`record_beta_draws`, `replay_beta_draws`). Every forward pass
  draws lambda_i ~ Beta(alpha, alpha) per item from torch's global generator; ours draws from
  a JAX key, the same distribution but other numbers. `torch.distributions.beta.Beta.sample` is
  wrapped while the reference runs, so each of its draws is recorded, and our side receives the
  same lambdas through `cm3.loss_with_mix_weights` / `cm3.forward`, which take them explicitly.
  The perturbed reference of the noise floor replays the same draws.

Tolerances are float32 tolerances, justified in the comments below and in docs/parity.md.
"""
import contextlib
import copy
import functools
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from lirdrec_jax import graph, optim, parallel, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import cm3
from lirdrec_jax.models.layers import l2_normalize
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import convert, reference
from lirdrec_jax.parity.common import (ReferenceSide, ReferenceTwins, adam_step_checks,
                                       built_reference, compare_sparse, export_check,
                                       grads_by_reference_key, kink_tolerant_gradient_checks,
                                       knn_tie_rows, metric_floor_checks, numpy_of,
                                       parameter_floor_checks, same_embedding_checks, torch_batch,
                                       torch_sparse_to_scipy)

MODEL = cm3.MODEL
REFERENCE_REPO = 'enoche/CM3'

# Tolerances.
TOL_GRAPH = 1e-6          # absolute, on normalised graph entries (values <= 1): one float32 ulp
TOL_EMB = 1e-5            # times max|ref|: float32 matmuls over up to 4096-wide inputs and sparse
                          # sums in another order, relative error ~sqrt(d) 2^-24 ~ 4e-6
TOL_MIX = 1e-5            # times max|ref| (unit rows): two projections, a normalisation, an acos
                          # and the slerp weights; acos amplifies a cosine's rounding by
                          # 1/sin(angle), ~1e-7 / sin for the angles of real data
TOL_LOSS = 1e-5           # relative, on a batch loss (sums of B^2 exponentials in another order)
TOL_LOSS_ABS = 1e-6       # absolute: the loss adds O(1) terms of both signs and can be near 0
TOL_GRAD = 1e-4           # times max|grad| of the parameter
TOL_STEP = 1e-3           # times the learning rate, on parameters after one Adam step
TOL_METRIC_SAME_EMB = 1e-4   # one unit of the 4-decimal rounding
# The training-trajectory quantities (epoch losses and metrics, parameters after the epochs) are
# judged against their measured noise floor instead (checks.floor_check): within
# checks.FLOOR_MULTIPLE times the floor, or the tolerance of the same quantity from identical
# inputs above (TOL_LOSS, TOL_METRIC_SAME_EMB; for parameters common.KINK_STEPS lr), whichever
# is larger.


# ----------------------------------------------------------------------------------------------
# CM3's names in the reference
# ----------------------------------------------------------------------------------------------

# reference key -> (our path, transpose)
PARAM_TABLE: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    'theta': (('theta',), False),
    'v_preference': (('image_preference',), False),
    't_preference': (('text_preference',), False),
    'id_preference': (('mix_preference',), False),
}
for _ref, _ours in (('v', 'image'), ('t', 'text')):
    PARAM_TABLE[f'{_ref}_MLP.weight'] = ((f'{_ours}_tower', 'hidden', 'kernel'), True)
    PARAM_TABLE[f'{_ref}_MLP.bias'] = ((f'{_ours}_tower', 'hidden', 'bias'), False)
    PARAM_TABLE[f'{_ref}_MLP_1.weight'] = ((f'{_ours}_tower', 'out', 'kernel'), True)
for _ref, _ours in (('text_nn', 'text_projection'), ('image_nn', 'image_projection')):
    PARAM_TABLE[f'{_ref}.weight'] = ((_ours, 'kernel'), True)
    PARAM_TABLE[f'{_ref}.bias'] = ((_ours, 'bias'), False)

# Trainable copies of the features (`from_pretrained(freeze=False)`) that the forward pass never
# reads: they never get a gradient, so Adam never moves them (quirk CR4). We do not hold them.
FEATURE_KEYS = {'image_embedding.weight': 'image', 'text_embedding.weight': 'text'}


def state_dict_to_params(state_dict, template, features=None) -> dict:
    """`convert.state_dict_to_params` with CM3's names."""
    return convert.state_dict_to_params(state_dict, template, features, table=PARAM_TABLE,
                                        feature_keys=FEATURE_KEYS)


def params_to_state_dict(params, features) -> dict:
    """`convert.params_to_state_dict` with CM3's names."""
    return convert.params_to_state_dict(jax.tree.map(np.asarray, params), features,
                                        table=PARAM_TABLE, feature_keys=FEATURE_KEYS)


def _features(dataset: MMRecDataset) -> dict:
    return {'image': dataset.image_feat, 'text': dataset.text_feat}


# ----------------------------------------------------------------------------------------------
# The shims: the reference on a CPU, its Beta draws recorded and replayed
# ----------------------------------------------------------------------------------------------

def unregister_result_embed(model) -> None:
    """Turn the reference's registered `result_embed` Parameter into a plain attribute (what
    `nn.Parameter(...).to('cuda')` gives on CUDA), so that its forward pass may assign to it."""
    param = model._parameters.pop('result_embed', None)
    if param is not None:
        model.result_embed = param.detach()


def with_cpu_shim(model_class):
    """`model_class` with its constructor followed by `unregister_result_embed` (patched on the
    class, in this process only, once; returns the class)."""
    if model_class.__dict__.get('_lirdrec_cpu_shim', False):
        return model_class
    original = model_class.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        unregister_result_embed(self)

    model_class.__init__ = __init__
    model_class._lirdrec_cpu_shim = True
    return model_class


@contextlib.contextmanager
def _beta_sample_patched(sample):
    from torch.distributions import beta
    had = 'sample' in beta.Beta.__dict__
    original = beta.Beta.__dict__.get('sample')
    beta.Beta.sample = sample
    try:
        yield
    finally:
        if had:
            beta.Beta.sample = original
        else:
            del beta.Beta.sample


@contextlib.contextmanager
def record_beta_draws():
    """Within the block, every `Beta(...).sample(shape)` draws as usual and its result is
    appended (a copy) to the yielded list."""
    from torch.distributions import Distribution
    draws = []
    inner = Distribution.sample

    def sample(self, sample_shape=()):
        out = inner(self, sample_shape)
        draws.append(out.detach().clone())
        return out

    with _beta_sample_patched(sample):
        yield draws


@contextlib.contextmanager
def replay_beta_draws(draws: list):
    """Within the block, the n-th `Beta(...).sample(shape)` returns `draws[n]` instead of
    drawing (same shape required); the yielded list collects the draws returned, so the caller
    can check that all were used."""
    import torch
    used = []

    def sample(self, sample_shape=()):
        if len(used) >= len(draws):
            raise RuntimeError(f'the reference drew more than the {len(draws)} recorded Beta '
                               'samples')
        out = draws[len(used)]
        expected = tuple(torch.Size(sample_shape)) + tuple(self.batch_shape)
        if tuple(out.shape) != expected:
            raise RuntimeError(f'recorded Beta draw of shape {tuple(out.shape)}, the reference '
                               f'asks for {expected}')
        used.append(out)
        return out.clone()

    with _beta_sample_patched(sample):
        yield used


# ----------------------------------------------------------------------------------------------
# The reference side and its config
# ----------------------------------------------------------------------------------------------

def reference_side(checkout) -> ReferenceSide:
    """The reference's own model (with the CPU shim) and trainer, imported from the checkout."""
    ref = reference.load_reference(checkout, 'cm3', 'CM3', REFERENCE_REPO)
    return ReferenceSide(with_cpu_shim(ref.Model), ref.Trainer)


def reference_model_config(point_cfg) -> dict:
    """CM3's own keys of the reference's config dict (exactly those its constructor reads;
    `reference.reference_config` adds the framework's), from one of our grid points (scalars).

    `lambda_coeff` is read and never used (CM3.yaml's 0.9). `dropout` must be 0: the reference's
    pre_epoch_processing sets its training graph only for dropout <= 0 (CM3.yaml's 0.0). One
    field of ours sizes both `embedding_size` and `feat_embed_dim` (the latter is unused).
    """
    m = point_cfg.model
    return {
        'model': 'CM3', 'embedding_size': m.embedding_size, 'feat_embed_dim': m.embedding_size,
        'knn_k': m.knn_k, 'lambda_coeff': 0.9, 'n_mm_layers': m.n_mm_layers,
        'n_ui_layers': m.n_ui_layers, 'mm_image_weight': m.mm_image_weight, 'dropout': 0.0,
        'gamma': m.gamma, 'max_sim': m.max_sim, 'min_sim': m.min_sim, 'alpha': m.alpha,
    }


def run_reference_benchmark(checkout, dataset: MMRecDataset, args, point_cfg) -> dict:
    """The benchmark's `--reference` (bench.py): the reference (with the CPU shim) timed on the
    same data. Its feature copies never train (quirk CR4): left out of the parameter count."""
    ref = reference.load_reference(checkout, 'cm3', 'CM3', REFERENCE_REPO)
    with_cpu_shim(ref.Model)  # the class `reference.run_reference_benchmark` imports again
    return reference.run_reference_benchmark(checkout, dataset, args, point_cfg, 'cm3', 'CM3',
                                             repository=REFERENCE_REPO,
                                             unused_parameters=tuple(
                                                 k.split('.')[0] + '.' for k in FEATURE_KEYS))


def train_reference_to_early_stopping(side: ReferenceSide, point_cfg, dataset: MMRecDataset,
                                      dataset_dir, seed: int, make_loaders=None):
    """CM3's reference trained to early stopping with its own random streams (its Beta draws
    included), seeded as its quick_start seeds (`full.fit_reference`). Returns a
    `full.RunOutcome`."""
    from lirdrec_jax.parity import full
    return full.fit_reference(side, point_cfg, dataset, dataset_dir, seed, make_loaders)


# ----------------------------------------------------------------------------------------------
# Our side's compiled pieces
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _forward(net, params, frozen, mix_weights):
    """cm3.forward, and its users and items L2-normalised as the loss reads them."""
    users, items, mix = cm3.forward(net, params, frozen, mix_weights)
    return users, items, mix, l2_normalize(users), l2_normalize(items)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _step(net, weight_decay: float, state: train.TrainState, batch, frozen, scalars,
          mix_weights):
    """Our training step with given lambdas: the trainer's (`train.train_step_fn`, Adam from
    `optim.create_optimizer`) with `cm3.loss_with_mix_weights` in place of the draw from the
    step's key. Returns (state, loss, gradients). One compiled function for the single-step
    checks and the training epochs."""
    optimizer = optim.create_optimizer(weight_decay)
    (value, carry), grads = jax.value_and_grad(
        lambda p: cm3.loss_with_mix_weights(net, p, batch, frozen, scalars, mix_weights),
        has_aux=True)(state.params)
    params, opt_state = train.apply_gradients(optimizer, state.params, state.opt_state, grads,
                                              scalars['learning_rate'])
    return train.TrainState(params, opt_state, carry), value, grads


def _initial_state(net, params, frozen, weight_decay: float) -> train.TrainState:
    """Adam's initial state and an empty carry, placed (committed) like the step's outputs, so
    that the step compiles once."""
    carry = MODEL.init(jax.random.PRNGKey(0), net, frozen, frozen)[1]
    state = train.TrainState(params, optim.create_optimizer(weight_decay).init(params), carry)
    return jax.device_put(state, jax.devices()[0])


def _scalars(point_cfg, epoch: int) -> dict:
    """The step's scalars of `epoch` (the model's and the learning rate), on the device."""
    _, scalars = train.epoch_scalars(MODEL, point_cfg, MODEL.host_init(point_cfg.model), epoch)
    return train.device_scalars(scalars)


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

        log('comparing graphs ...')
        our_adj = graph.norm_adjacency_scipy(dataset.train.users, dataset.train.items,
                                             dataset.n_users, dataset.n_items)
        results += compare_sparse('user-item adjacency', our_adj.astype(np.float32),
                                  torch_sparse_to_scipy(ref_model.norm_adj), TOL_GRAPH)
        ties = np.unique(np.concatenate([knn_tie_rows(f, int(m.knn_k))
                                         for f in (ours.image, ours.text)]))
        ref_knn = torch_sparse_to_scipy(ref_model.mm_adj)
        weights = graph.modality_weights(True, True, float(m.mm_image_weight))
        results += compare_sparse('item-item kNN graph',
                                  graph.knn_item_graph_scipy([ours.image, ours.text], weights,
                                                             int(m.knn_k)),
                                  ref_knn, TOL_GRAPH, allowed_rows=ties)
        # Downstream checks use the reference's kNN graph, so that tied neighbour choices (both
        # correct) do not show up as differences in every later quantity.
        item_graph = jsparse.BCOO.from_scipy_sparse(ref_knn.astype(np.float32))
        frozen_host = cm3.Frozen(ours.image, ours.text, ours.user_item, item_graph)
        frozen = MODEL.place_frozen(frozen_host, parallel.Partitioner(num_devices=1),
                                    train.RunOptions())

        net = MODEL.create(m, dataset.n_users, dataset.n_items)
        template, _ = MODEL.init(jax.random.PRNGKey(seed), net, frozen, frozen_host)
        # Copies: numpy views of torch tensors share their memory, which the reference's Adam
        # then updates in place (and JAX may keep a host buffer without copying it).
        params = state_dict_to_params({k: numpy_of(v).copy()
                                       for k, v in ref_model.state_dict().items()},
                                      template, _features(dataset))
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), params)
        exported = params_to_state_dict(params, _features(dataset))
        results.append(export_check(ref_model, exported))

        # The train step donates its input state: each phase gets its own copy of the weights.
        fresh = lambda: jax.tree.map(jnp.array, params)
        results += _single_step_checks(side, copy.deepcopy(ref_model), ref_cfg, net, fresh(),
                                       prepared, frozen, point_cfg, seed, log)
        if epochs > 0:
            results += _training_checks(side, ref_model, ref_cfg, net, fresh(), prepared,
                                        frozen, point_cfg, epochs, seed, log)
    return results


def _parallel_rows(ref_model) -> int:
    """How many items have parallel projected text and image directions in the reference's
    float32 (its clamped cosine is 1, so its slerp divides 0 by 0)."""
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        p_t = F.normalize(ref_model.text_nn(ref_model.t_feat), p=2, dim=1)
        p_v = F.normalize(ref_model.image_nn(ref_model.v_feat), p=2, dim=1)
        parallel = int(((p_t * p_v).sum(dim=1) >= 1.0).sum())
    return parallel


def _forward_checks(ref_model, net, params, frozen) -> List[C.Check]:
    """One forward pass on both sides with the reference's own lambdas."""
    import torch
    ref_model.pre_epoch_processing()
    with record_beta_draws() as draws, torch.no_grad():
        ref_u, ref_i, ref_mix = ref_model.forward(ref_model.masked_adj)
    n_items = net.n_items
    out = [C.Check('forward: Beta draws captured', float(len(draws)), 0.0,
                   f'one draw of {n_items} lambdas in [0, 1]',
                   len(draws) == 1 and tuple(draws[0].shape) == (n_items,)
                   and bool(((draws[0] >= 0) & (draws[0] <= 1)).all()),
                   f'{len(draws)} draw(s) of shape {[tuple(d.shape) for d in draws]}')]
    if not out[0].passed:
        return out
    lam = jnp.asarray(numpy_of(draws[0]))
    # The parallel case: the reference's mix is NaN there (quirk CD1), ours is the limit. The
    # comparison below is meaningful only without such rows; they are counted and declared.
    parallel = _parallel_rows(ref_model)
    nan_rows = int(torch.isnan(ref_mix).any(dim=1).sum())
    out.append(C.Check('slerp: parallel text/image projections', float(parallel), 0.0,
                       'none (the reference gives NaN there)', parallel == 0 and nan_rows == 0,
                       f'{parallel} parallel rows, {nan_rows} NaN rows in the reference mix'))
    users, items, mix, unit_users, unit_items = _forward(net, params, frozen, lam)
    out.append(C.compare('forward: slerp mix', mix, numpy_of(ref_mix), atol=TOL_MIX,
                         scale_atol_by_ref_max=True))
    out.append(C.compare('forward: user embeddings (normalised)', unit_users,
                         numpy_of(ref_u), atol=TOL_EMB, scale_atol_by_ref_max=True))
    out.append(C.compare('forward: item embeddings (normalised)', unit_items,
                         numpy_of(ref_i), atol=TOL_EMB, scale_atol_by_ref_max=True))
    # What evaluation scores with: the reference's result_embed, unnormalised.
    ref_embed = numpy_of(ref_model.result_embed)
    out.append(C.compare('forward: result_embed, users', users, ref_embed[:net.n_users],
                         atol=TOL_EMB, scale_atol_by_ref_max=True))
    out.append(C.compare('forward: result_embed, items', items, ref_embed[net.n_users:],
                         atol=TOL_EMB, scale_atol_by_ref_max=True))
    return out


def _single_step_checks(side, ref_model, ref_cfg, net, params, prepared, frozen, point_cfg,
                        seed, log) -> List[C.Check]:
    m, o = point_cfg.model, point_cfg.optim
    out: List[C.Check] = []
    log('comparing forward pass, loss, gradients, one Adam step ...')
    out += _forward_checks(ref_model, net, params, frozen)

    # Loss and gradients on the first batch of epoch 0, the reference's lambdas imported.
    batches = sampling.batch_kind(MODEL.batch_kind).draw(
        sampling.epoch_rng(seed, 0), prepared.sampler, int(point_cfg.train.batch_size))
    ref_batch = torch_batch(batches, 0)
    trainer = side.make_trainer(ref_cfg, ref_model)
    trainer.optimizer.zero_grad()
    with record_beta_draws() as draws:
        ref_loss = ref_model.calculate_loss(ref_batch)
    ref_loss.backward()
    ref_grads = grads_by_reference_key(ref_model)
    batch = sampling.EpochBatches(*(jnp.asarray(a[0]) for a in batches))
    scalars = _scalars(point_cfg, 0)
    lam = jnp.asarray(numpy_of(draws[0]))
    # One step from the same parameters: loss, carry, gradients and the Adam step after them.
    state = _initial_state(net, params, frozen, float(o.weight_decay))
    state, loss, grads = _step(net, float(o.weight_decay), state, batch, frozen, scalars, lam)
    carry, after = state.carry, state.params
    out.append(C.compare('loss on one batch', float(loss), ref_loss.item(), atol=TOL_LOSS_ABS,
                         rtol=TOL_LOSS))
    ref_embed = numpy_of(ref_model.result_embed)
    out.append(C.compare('evaluation embeddings of that batch (carry = result_embed)',
                         np.concatenate([carry.user_emb, carry.item_emb]), ref_embed,
                         atol=TOL_EMB, scale_atol_by_ref_max=True))
    our_grads = params_to_state_dict(grads, _features(prepared.dataset))

    def loss_of(model):  # the float64 rerun replays this batch's lambdas
        with replay_beta_draws(draws):
            return model.calculate_loss(ref_batch)
    out += kink_tolerant_gradient_checks(PARAM_TABLE, our_grads, ref_grads, TOL_GRAD, ref_model,
                                         loss_of)
    # The reference's trainable feature copies are never read: no gradient, never moved (CR4).
    frozen_copies = [k for k in FEATURE_KEYS if k in ref_grads]
    out.append(C.Check('no gradient for image_embedding / text_embedding (never read)',
                       float(len(frozen_copies)), 0.0, 'none on the reference side',
                       not frozen_copies, ', '.join(frozen_copies)))

    # One Adam step from the same parameters, each side with the gradients compared above.
    trainer.optimizer.step()
    ours_after = params_to_state_dict(after, _features(prepared.dataset))
    out += adam_step_checks(PARAM_TABLE, our_grads, ref_grads, ours_after,
                            dict(ref_model.named_parameters()), float(o.learning_rate), TOL_STEP)

    # Top-k lists and metrics from identical embeddings: the reference's evaluator scores with
    # its result_embed (the batch's forward, before the step); ours ranks those same arrays.
    out += same_embedding_checks(trainer, ref_embed[:net.n_users], ref_embed[net.n_users:],
                                 prepared, point_cfg.eval, TOL_METRIC_SAME_EMB)
    return out


def _train_reference_epoch(twins: ReferenceTwins, batches: list, epoch: int) -> tuple:
    """One epoch of the reference (its Beta draws recorded) and of its perturbed copy (the same
    draws replayed), on the same batches. Returns (reference loss, perturbed loss, draws,
    draws replayed)."""
    with record_beta_draws() as draws:
        ref_loss, _ = twins.trainers[0]._train_epoch(batches, epoch)
    with replay_beta_draws(draws) as replayed:
        perturbed_loss, _ = twins.trainers[1]._train_epoch(batches, epoch)
    for trainer in twins.trainers:
        trainer.lr_scheduler.step()
    return float(ref_loss), float(perturbed_loss), draws, len(replayed)


def _training_checks(side, ref_model, ref_cfg, net, params, prepared, frozen, point_cfg,
                     epochs, seed, log) -> List[C.Check]:
    """Both sides trained on identical batches with identical lambdas; every trajectory quantity
    is judged against its noise floor, the reference trained again from its weights moved one
    ulp, on the same batches with the same lambdas."""
    t, e, o = point_cfg.train, point_cfg.eval, point_cfg.optim
    out: List[C.Check] = []
    twins = ReferenceTwins(side, ref_model, ref_cfg)
    weight_decay = float(o.weight_decay)
    state = _initial_state(net, params, frozen, weight_decay)
    for epoch in range(epochs):
        log(f'training epoch {epoch} on both sides and the perturbed reference ...')
        twins.start_epoch()
        batches = sampling.batch_kind(MODEL.batch_kind).draw(
            sampling.epoch_rng(seed, epoch), prepared.sampler, int(t.batch_size))
        n_batches = batches.users.shape[0]
        ref_loss, perturbed_loss, draws, replayed = _train_reference_epoch(
            twins, [torch_batch(batches, b) for b in range(n_batches)], epoch)
        out.append(C.Check(f'epoch {epoch}: Beta draws imported', float(len(draws)), 0.0,
                           'one per batch, replayed to the perturbed reference',
                           len(draws) == n_batches and replayed == n_batches,
                           f'{len(draws)} drawn, {replayed} replayed, {n_batches} batches'))
        if len(draws) != n_batches:
            break
        sc = _scalars(point_cfg, epoch)
        losses = []
        for b in range(n_batches):
            batch = sampling.EpochBatches(*(jnp.asarray(a[b]) for a in batches))
            state, value, _ = _step(net, weight_decay, state, batch, frozen, sc,
                                    jnp.asarray(numpy_of(draws[b])))
            losses.append(value)
        loss = train.summed_loss(np.asarray(jnp.stack(losses)), epoch)
        minimum = max(TOL_LOSS * abs(ref_loss), TOL_LOSS_ABS * n_batches)
        out.append(C.floor_check(f'epoch {epoch}: summed training loss', loss, ref_loss,
                                 perturbed_loss, minimum=minimum))
        out += metric_floor_checks(f'epoch {epoch}: ', twins, state.carry.user_emb,
                                   state.carry.item_emb, prepared, e, TOL_METRIC_SAME_EMB)
    ours_by_key = params_to_state_dict(state.params, _features(prepared.dataset))
    out += parameter_floor_checks(f'parameters after {epochs} epochs', ours_by_key, twins,
                                  PARAM_TABLE, float(o.learning_rate))
    return out
