"""Parity machinery shared by every model's parity module: sparse-matrix and top-k comparisons,
torch <-> numpy helpers, the reference side's interface, and the perturbed reference that
measures the noise floor of the training trajectories. Model-specific check sequences live in
`lirdrec_jax/parity/<model>.py`."""
import contextlib
import copy
import itertools
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from lirdrec_jax import evaluation, optim, parallel, sampling, train
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import reference


class ReferenceSide(NamedTuple):
    """The PyTorch side: the model class and a trainer factory with the reference's interface
    (`trainer.optimizer`, `trainer.lr_scheduler.step()`, `trainer._train_epoch(batches, epoch)`,
    `trainer.evaluate(eval_data)`, `trainer.evaluator.evaluate(topk_list, eval_data)`)."""
    model_class: type
    make_trainer: Callable


def torch_sparse_to_scipy(tensor) -> sp.csr_matrix:
    t = tensor.coalesce()
    idx = t.indices().numpy()
    return sp.csr_matrix((t.values().double().numpy(), (idx[0], idx[1])), shape=tuple(t.shape))


def compare_sparse(name: str, ours: sp.spmatrix, ref: sp.spmatrix, atol: float,
                   allowed_rows: Optional[np.ndarray] = None) -> List[C.Check]:
    """Structure (which entries exist) and values of two sparse matrices.

    `allowed_rows` (rows with tied kNN neighbours, `knn_tie_rows`) may differ in structure, and
    their values are not compared: in a graph mixed from several modalities' kNN graphs a tie
    can change a row's values and not its structure (items b and c are duplicates; the text
    graph keeps both, the image graph b on one side and c on the other: the same entries with
    other weights). Every other row must match in both.
    """
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
    skipped = rows if allowed_rows is None else np.union1d(rows, allowed_rows)
    same_rows = np.setdiff1d(np.arange(ref.shape[0]), skipped)
    diff = abs(ours[same_rows] - ref[same_rows])
    max_abs = float(diff.max()) if diff.nnz else 0.0
    rel = diff.multiply(abs(ref[same_rows]).power(-1).tocsr().multiply(abs(ref[same_rows]) > 0))
    values = C.Check(f'{name}: values', max_abs, float(rel.max()) if rel.nnz else 0.0,
                     f'|d| <= {atol:g}', max_abs <= atol,
                     f'{skipped.size} rows with tied neighbours not compared'
                     if allowed_rows is not None and skipped.size else '')
    return [structure, values]


def knn_tie_rows(features: np.ndarray, k: int, rel: float = 1e-6, block: int = 2048) -> np.ndarray:
    """Rows whose k-th and (k+1)-th largest cosine similarities are within `rel` (relative):
    the top-k boundary falls inside a group of (nearly) equal similarities, so the top-k set is
    ambiguous in float32 and two correct implementations may pick different neighbours.

    The similarities are those the kNN graphs rank: every row against every row, itself
    included (the references' `torch.topk` over the full similarity matrix, ours alike), so
    `k` is the configured `knn_k`. Duplicated feature rows are exact ties.

    Args:
      features: (n_items, d) one modality's features.
      k: neighbours kept per row (self included).

    Returns:
      Sorted row indices (none when k >= n_items: every row keeps every item).
    """
    x = np.asarray(features, np.float64)
    if k >= x.shape[0]:
        return np.zeros(0, np.int64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for start in range(0, unit.shape[0], block):
        sim = unit[start:start + block] @ unit.T
        # The k+1 largest similarities of each row, largest first.
        largest = -np.sort(np.partition(-sim, k, axis=1)[:, :k + 1], axis=1)
        kth, next_ = largest[:, k - 1], largest[:, k]
        tied = kth - next_ <= rel * np.maximum(np.abs(kth), 1e-12)
        out.append(np.flatnonzero(tied) + start)
    return np.concatenate(out)


def numpy_of(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def grads_by_reference_key(model) -> dict:
    return {k: numpy_of(p.grad) for k, p in model.named_parameters() if p.grad is not None}


def torch_batch(batches: sampling.EpochBatches, b: int):
    import torch
    real = batches.weights[b] > 0
    return torch.from_numpy(np.stack([batches.users[b][real], batches.positives[b][real],
                                      batches.negatives[b][real]]).astype(np.int64))


class TopkCapture:
    """Wraps the reference evaluator to keep the top-k lists it is given."""

    def __init__(self, trainer):
        self.trainer, self.lists = trainer, None
        self._inner = trainer.evaluator.evaluate
        trainer.evaluator.evaluate = self

    def __call__(self, batch_matrix_list, eval_data, *args, **kwargs):
        import torch
        self.lists = torch.cat(batch_matrix_list, 0).numpy()
        return self._inner(batch_matrix_list, eval_data, *args, **kwargs)


def topk_check(name, ours, ref, users, items) -> C.Check:
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


def deepcopy_model(model):
    """A deep copy of a torch model, also when it caches tensors with autograd history (the
    last forward's), which `copy.deepcopy` refuses: their values are copied. The model itself
    is left untouched."""
    import copy
    import torch
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if torch.is_tensor(value) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def reference_grads_in_float64(model, loss_of: Callable) -> dict:
    """The gradients of `loss_of(copy)` for a float64 copy of a torch model: its parameters and
    every float32 tensor it holds as a plain attribute (graphs, features, cached state). The
    arbiter when a float32 gradient of ours and of the reference differ: both are compared
    with the reference's own math without float32 rounding."""
    import torch
    twin = deepcopy_model(model).double()
    for module in twin.modules():
        for name, value in list(vars(module).items()):
            if torch.is_tensor(value) and value.dtype == torch.float32:
                setattr(module, name, value.double())
    twin.zero_grad()
    loss_of(twin).backward()
    return {k: p.grad.detach().numpy() for k, p in twin.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# The noise floor of the training trajectories: the reference trained a second time, from its
# initial weights moved one ulp, on the same batches (checks.floor_check, docs/parity.md).
# ----------------------------------------------------------------------------------------------

def _parameter_aliases(model) -> List[tuple]:
    """(module name, attribute, parameter name) of the plain tensor attributes that ARE a
    parameter's data (same storage, offset, shape and strides), e.g. the reference PWC's
    `last_att = theta.data`. `copy.deepcopy` copies them as separate tensors."""
    import torch
    layout = lambda t: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                        t.stride())
    params = {layout(p): name for name, p in model.named_parameters()}
    out = []
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if (torch.is_tensor(value) and value.layout == torch.strided
                    and not isinstance(value, torch.nn.Parameter) and layout(value) in params):
                out.append((module_name, attr, params[layout(value)]))
    return out


def perturbed_copy(model):
    """A deep copy of a torch model whose floating-point parameters are each moved one ulp
    towards +inf (`torch.nextafter(p, +inf)`, element-wise as `np.nextafter`). Nothing else
    changes, except that attributes which are a parameter's data in `model` (the reference's
    `last_att = theta.data`) stay that parameter's data in the copy, so they move with it."""
    import torch
    aliases = _parameter_aliases(model)
    twin = deepcopy_model(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for p in params.values():
            if p.is_floating_point():
                p.copy_(torch.nextafter(p, torch.full_like(p, float('inf'))))
    for module_name, attr, param_name in aliases:
        setattr(twin.get_submodule(module_name), attr, params[param_name].data)
    return twin


def same_masked_adjacency(a, b) -> bool:
    """Whether two reference models hold the same training graph `masked_adj` (raw entries,
    both None counts as the same)."""
    import torch
    x, y = getattr(a, 'masked_adj', None), getattr(b, 'masked_adj', None)
    if x is None or y is None:
        return x is None and y is None
    return torch.equal(x._indices(), y._indices()) and torch.equal(x._values(), y._values())


class ReferenceTwins:
    """The reference and its perturbed copy (`perturbed_copy`), each with its own trainer,
    driven through the same epochs on the same batches: whatever separates their trajectories
    is float32 noise, amplified by training. The first of `models` / `trainers` is the
    reference itself."""

    def __init__(self, side: ReferenceSide, model, config):
        self.models = (model, perturbed_copy(model))
        self.trainers = tuple(side.make_trainer(config, m) for m in self.models)

    def start_epoch(self) -> bool:
        """Both models' `pre_epoch_processing()` from the same torch RNG state (FREEDOM draws
        its pruned graph with torch's global generator). Returns whether both hold the same
        training graph afterwards."""
        import torch
        state = torch.get_rng_state()
        for model in self.models:
            torch.set_rng_state(state)
            model.pre_epoch_processing()
        return same_masked_adjacency(*self.models)

    def train_epoch(self, batches: list, epoch: int) -> tuple:
        """One epoch on both, on the same torch batches, then each scheduler's step. Returns
        the two summed losses."""
        losses = []
        for trainer in self.trainers:
            loss, _ = trainer._train_epoch(batches, epoch)
            trainer.lr_scheduler.step()
            losses.append(float(loss))
        return tuple(losses)

    def evaluate(self, split, batch_size: int) -> tuple:
        """Both trainers' metrics on one of our splits, keys lower-case."""
        return tuple({k.lower(): v for k, v in
                      t.evaluate(reference.ReferenceEvalData(split, batch_size)).items()}
                     for t in self.trainers)

    def read(self, value_of: Callable) -> tuple:
        """`value_of(model)` (a tensor or a number) on both models, as numpy."""
        values = [value_of(m) for m in self.models]
        return tuple(numpy_of(v) if hasattr(v, 'detach') else np.float64(v) for v in values)


# Two opposite Adam steps of the largest size an element's first steps can take,
# (1 - beta1) / sqrt(1 - beta2) = 3.16 learning rates each (beta1 = 0.9, beta2 = 0.999).
KINK_STEPS = 2 * 0.1 / 0.001 ** 0.5


def parameter_floor_checks(name: str, ours: dict, twins: ReferenceTwins, keys,
                           lr: float) -> List[C.Check]:
    """One `floor_check` per parameter after the trained epochs: ours (by reference key) against
    the reference's, with the perturbed reference's as the floor.

    The minimum is KINK_STEPS * lr: a hidden unit whose pre-activation comes within float32
    rounding of leaky_relu's kink at some step lands on opposite sides in two correct runs, so
    its gradient flips there and its weights separate by up to about two opposite Adam steps;
    which units do so is chance, in the perturbed run as in ours (docs/parity.md)."""
    ref, perturbed = (dict(m.named_parameters()) for m in twins.models)
    return [C.floor_check(f'{name}: {k}', ours[k], numpy_of(ref[k]), numpy_of(perturbed[k]),
                          minimum=KINK_STEPS * lr) for k in keys]


def same_embedding_checks(trainer, users: np.ndarray, items: np.ndarray, prepared, eval_cfg,
                          atol: float) -> List[C.Check]:
    """Top-k lists and metrics of valid and test from identical embeddings: the reference's
    evaluator (`trainer.evaluate`, which must score with `users`/`items`) against our ranking
    of the same (n_users, d) and (n_items, d) arrays; lists may differ only at near-equal
    scores, metrics by `atol`."""
    capture = TopkCapture(trainer)
    out = []
    for name, split in (('valid', prepared.valid), ('test', prepared.test)):
        ref_metrics = trainer.evaluate(reference.ReferenceEvalData(split,
                                                                   int(eval_cfg.batch_size)))
        ours_topk = evaluation.full_sort_topk(users, items, split, k=max(eval_cfg.topk))
        ours_metrics = evaluation.topk_metrics(evaluation.hit_matrix(ours_topk, split),
                                               split.pos_len, metrics=eval_cfg.metrics,
                                               ks=eval_cfg.topk)
        out.append(topk_check(f'{name} top-{ours_topk.shape[1]} lists', ours_topk,
                              capture.lists, users[split.users], items))
        out.append(C.metrics_check(f'{name} metrics, same embeddings', ours_metrics,
                                   {k.lower(): v for k, v in ref_metrics.items()}, atol=atol))
    return out


def missing_gradient_check(key: str) -> C.Check:
    """The failing check of a parameter of ours for which the reference computes no gradient."""
    return C.Check(f'gradient {key}', float('nan'), float('nan'), 'a gradient on both sides',
                   False, 'the reference computes no gradient for it')


def gradient_checks(keys, our_grads: dict, ref_grads: dict, tol_grad: float, bias_keys=(),
                    bias_scale: float = 0.0, bias_scale_text: str = '') -> List[C.Check]:
    """One check per parameter in `keys` (every one must have a reference gradient): within
    `tol_grad` times max|ref gradient|.

    `bias_keys` are biases that cancel in every pairwise margin (the same term is added to the
    positive and the negative score): their exact gradient is 0 and both sides hold rounding
    noise, so a bound relative to their own (noise) scale means nothing. They are bounded by
    `tol_grad * bias_scale` instead, `bias_scale` being the scale of the terms that cancel,
    which `bias_scale_text` names in the check's note.
    """
    out = []
    for key in keys:
        if key not in ref_grads:
            out.append(missing_gradient_check(key))
        elif key in bias_keys:
            out.append(C.compare(f'gradient {key}', our_grads[key], ref_grads[key],
                                 atol=tol_grad * bias_scale,
                                 note=f'exactly 0 up to rounding; bound {tol_grad:g} * '
                                      f'{bias_scale_text} = {tol_grad * bias_scale:.3g}'))
        else:
            out.append(C.compare(f'gradient {key}', our_grads[key], ref_grads[key],
                                 atol=tol_grad, scale_atol_by_ref_max=True))
    return out


def our_adam_step(params, grads, weight_decay: float, learning_rate: float):
    """`params` after our first Adam step (fresh optimizer state) with `grads`."""
    optimizer = optim.create_optimizer(float(weight_decay))
    after, _ = train.apply_gradients(optimizer, params, optimizer.init(params), grads,
                                     jnp.float32(learning_rate))
    return after


def adam_step_checks(keys, our_grads: dict, ref_grads: dict, ours_after: dict, ref_params: dict,
                     lr: float, tol_step: float) -> List[C.Check]:
    """One check per parameter in `keys` after one Adam step from the same parameters, each
    side with its own gradient; keys without a reference gradient are skipped (the gradient
    checks report them).

    Adam's first step moves each element by lr * g / (|g| + eps). Each side uses its own
    gradient (compared before the step), so the allowed difference is what the two gradients
    imply, lr * |g_ours / (|g_ours| + eps) - g_ref / (|g_ref| + eps)|, plus float32 rounding of
    the parameter (2^-22 |p|) and `tol_step` * lr. For a parameter whose gradients are rounding
    noise on both sides, the implied term is the whole allowance.

    Args:
      keys: reference parameter names, in check order.
      our_grads, ref_grads, ours_after: numpy arrays by reference key.
      ref_params: the reference's parameters (torch tensors) by key, after its step.
    """
    out = []
    for key in keys:
        if key not in ref_grads:
            continue
        u_ours = our_grads[key] / (np.abs(our_grads[key]) + 1e-8)
        u_ref = ref_grads[key] / (np.abs(ref_grads[key]) + 1e-8)
        p_ref = numpy_of(ref_params[key])
        bound = tol_step * lr + lr * np.abs(u_ours - u_ref) + 2.0 ** -22 * np.abs(p_ref)
        out.append(C.within_bound(f'after one Adam step {key}', ours_after[key], p_ref, bound,
                                  f'|d| <= {tol_step:g} lr + implied'))
    return out


def export_check(ref_model, exported: dict) -> C.Check:
    """Our parameters in the reference's state_dict form (`exported`: numpy arrays by key) load
    into a copy of the reference model with strict=True (no key missing or extra, every shape
    right), and the loaded copy's state equals the reference model's, entry by entry."""
    import torch
    probe = copy.deepcopy(ref_model)
    probe.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    return C.exact('export: state_dict loaded by the reference (strict)',
                   np.concatenate([numpy_of(v).ravel() for v in probe.state_dict().values()]),
                   np.concatenate([numpy_of(v).ravel()
                                   for v in ref_model.state_dict().values()]))


def imported_trainer(model, point_cfg, prepared, net, params, frozen_host, seed: int) -> tuple:
    """Our trainer's own set-up of one point (its speed options: sparse products, scanned
    epochs, GEMM kernels) on one device, with `params` (imported from the reference) and
    `frozen_host` (built from the reference's inputs) in place of its own, the epoch key
    PRNGKey(`seed`). Returns (setup, epoch functions, partitioner); `setup.state` is the initial
    training state (fresh optimizer state, the trainer's initial carry)."""
    partitioner = parallel.Partitioner(num_devices=1)
    setup = train.setup_point(point_cfg, prepared, partitioner)
    frozen = model.place_frozen(frozen_host, partitioner, setup.options)
    state = train.TrainState(params, setup.optimizer.init(params), setup.state.carry)
    key = jax.random.PRNGKey(seed)
    setup = setup._replace(net=net, frozen_host=frozen_host, frozen=frozen, state=state, key=key,
                           epoch_key=key)
    return setup, train.make_epoch_fns(setup, partitioner, 'last_batch'), partitioner


@contextlib.contextmanager
def built_reference(side: ReferenceSide, point_cfg, dataset, dataset_dir, seed: int,
                    log: Callable[[str], None]):
    """The reference model (`side.model_class`) built on our data with `seed`, as
    (model, config); its staging folder (the dataset's files linked where the reference reads
    them) is removed on leaving, also when a check raises."""
    log('building the reference model ...')
    ref_model, ref_cfg, staging = reference.build_reference_model(
        None, point_cfg, dataset, dataset_dir, seed=seed, model_class=side.model_class)
    try:
        yield ref_model, ref_cfg
    finally:
        staging.cleanup()


def metric_floor_checks(prefix: str, twins: 'ReferenceTwins', users, items, prepared, eval_cfg,
                        minimum: float) -> List[C.Check]:
    """'<prefix>valid metrics' and '<prefix>test metrics': our full-sort metrics from the
    (n_users, d) `users` and (n_items, d) `items` embeddings against the reference's evaluator,
    the perturbed reference's distance from it the floor (`checks.floor_metrics_check`)."""
    metrics, ks = tuple(eval_cfg.metrics), tuple(eval_cfg.topk)
    out = []
    for name, split in (('valid', prepared.valid), ('test', prepared.test)):
        ref_metrics, perturbed_metrics = twins.evaluate(split, int(eval_cfg.batch_size))
        ours = evaluation.evaluate_full_sort(users, items, split, metrics=metrics, ks=ks)
        out.append(C.floor_metrics_check(f'{prefix}{name} metrics', ours, ref_metrics,
                                         perturbed_metrics, minimum=minimum))
    return out


def kink_tolerant_gradient_checks(keys, our_grads: dict, ref_grads: dict, tol_grad: float,
                                  ref_model, loss_of: Callable) -> List[C.Check]:
    """One check per parameter in `keys` (every one must have a reference gradient): within
    `tol_grad` times max|ref gradient|.

    A float32 pre-activation within rounding of leaky_relu's kink can take the other side on
    one implementation only, which changes a whole gradient row. A parameter that fails is
    therefore compared again against the reference's own math in float64
    (`reference_grads_in_float64(ref_model, loss_of)`, computed once, at the first failure),
    which decides; the check's note then gives the float32 difference.
    """
    out, ref_grads64 = [], None
    for key in keys:
        if key not in ref_grads:
            out.append(missing_gradient_check(key))
            continue
        check = C.compare(f'gradient {key}', our_grads[key], ref_grads[key], atol=tol_grad,
                          scale_atol_by_ref_max=True)
        if not check.passed:
            if ref_grads64 is None:
                ref_grads64 = reference_grads_in_float64(ref_model, loss_of)
            check = C.compare(f'gradient {key}', our_grads[key], ref_grads64[key],
                              atol=tol_grad, scale_atol_by_ref_max=True,
                              note='against the reference run in float64: its float32 '
                                   f'gradient differs by {check.max_abs:.2g} (a float32 kink)')
        out.append(check)
    return out


# ----------------------------------------------------------------------------------------------
# The benchmark's reference timing (`python -m lirdrec_jax.bench --reference`)
# ----------------------------------------------------------------------------------------------

# (phase, method) of the reference model timed inside its constructor: the methods of the
# MMRec-framework references (enoche/LIRDRec, enoche/FREEDOM) that build its graphs.
REFERENCE_GRAPH_METHODS = (('adjacency', 'get_norm_adj_mat'), ('graph', 'get_knn_adj_mat'))
# What `dense_knn_plan` counts for the reference's dense kNN build: the similarity matrix times
# DENSE_KNN_MATRIX_FACTOR (torch.topk's working memory on top of the matrix: LIRDRec's reference
# held 20.97 GB of RSS at Elec scale, a 14.79 GiB matrix, while still inside its build), the
# features held meanwhile (features, their unit-norm copy, a derived view) and a margin.
DENSE_KNN_MATRIX_FACTOR = 1.5
DENSE_KNN_FEATURE_COPIES = 3
DENSE_KNN_MARGIN_BYTES = 1 << 30


class ReferenceGraphCache(NamedTuple):
    """A reference's kNN-graph cache file, which it reads instead of building the graph.

    Attributes:
      file_name: its name in the dataset folder, for one point (e.g. LIRDRec's
        'mm_adj_lirdrec_{knn_k}_{int(10 * mm_image_weight)}.pt').
      build: `(dataset, point_cfg) -> scipy sparse (n_items, n_items)`: our graph with the
        values the reference's would have.
    """
    file_name: str
    build: Callable


def modality_knn_cache(prefix: str, point) -> ReferenceGraphCache:
    """The graph cache of an MMRec-framework reference that mixes the modalities' kNN graphs
    (w * image + (1 - w) * text, each normalised, as `graph.knn_item_graph_scipy`) and caches
    it as '<prefix>_{knn_k}_{int(10 * mm_image_weight)}.pt' (LIRDRec: 'mm_adj_lirdrec',
    FREEDOM: 'mm_adj_freedomdsp')."""
    from lirdrec_jax import graph
    m = point.model

    def build(dataset, point_cfg):
        feats = [f for f in (dataset.image_feat, dataset.text_feat) if f is not None]
        weights = graph.modality_weights(dataset.image_feat is not None,
                                         dataset.text_feat is not None,
                                         float(point_cfg.model.mm_image_weight))
        return graph.knn_item_graph_scipy(feats, weights, int(point_cfg.model.knn_k))

    # int(10 * w) as the reference computes it (0.1 -> 1, 0.3 -> 3).
    return ReferenceGraphCache(f'{prefix}_{int(m.knn_k)}_{int(10 * float(m.mm_image_weight))}.pt',
                               build)


def available_memory_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    from lirdrec_jax.bench import proc_kib_field
    return proc_kib_field('/proc/meminfo', 'MemAvailable')


def dense_knn_plan(n_items: int, feature_bytes: int, choice: str = 'auto',
                   available: Optional[int] = None) -> Tuple[bool, str]:
    """Whether the reference builds its kNN graph from a dense (n_items, n_items) float32
    similarity matrix (`choice` 'build'), reads ours from its cache file ('ours'), or, for
    'auto', builds it when the matrix and its top-k (DENSE_KNN_MATRIX_FACTOR x the matrix), the
    features held meanwhile and a margin fit in the available memory (`available`: bytes,
    default MemAvailable; unknown = fits).

    Returns:
      (build, why): e.g. (False, 'not built by the reference: its dense 63001 x 63001 float32
      similarity (14.79 GiB), its top-k and ... need about 26.5 GiB, 12.3 GiB available; ...').
    """
    dense = 4 * n_items ** 2
    need = int(DENSE_KNN_MATRIX_FACTOR * dense) + DENSE_KNN_FEATURE_COPIES * feature_bytes \
        + DENSE_KNN_MARGIN_BYTES
    gib = lambda n: f'{n / 2 ** 30:.2f} GiB'
    size = (f'its dense {n_items} x {n_items} float32 similarity ({gib(dense)}), its top-k and '
            f'the features held meanwhile need about {gib(need)}')
    if choice == 'build':
        return True, f'built by the reference (asked for; {size})'
    if choice == 'ours':
        return False, 'ours, read from its cache file (asked for): its build is not measured'
    if choice != 'auto':
        raise ValueError(f'reference graph choice {choice!r}; expected auto, build or ours')
    available = available_memory_bytes() if available is None else available
    if available is None or need <= available:
        return True, f'built by the reference ({size}' + (
            f', {gib(available)} available)' if available is not None else ')')
    return False, (f'not built by the reference: {size}, {gib(available)} available; ours was '
                   'written to its cache file, so its graph build is not measured')


def write_graph_cache(path, matrix) -> None:
    """A scipy sparse matrix saved as the float32 torch sparse COO tensor a reference's
    `torch.load` of its graph cache file gives."""
    import torch
    coo = sp.coo_matrix(matrix)
    coo.sum_duplicates()
    indices = torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64))
    tensor = torch.sparse_coo_tensor(indices, torch.from_numpy(coo.data.astype(np.float32)),
                                     coo.shape).coalesce()
    torch.save(tensor, path)


def _with_timed_methods(cls: type, methods, phases) -> type:
    """A subclass of the reference model class whose `methods` ((phase, name) pairs; absent
    names skipped) add their wall time to `phases` (same class name and parameters)."""
    def timed(phase, fn):
        def wrapper(self, *args, **kwargs):
            with phases.time(phase):
                return fn(self, *args, **kwargs)
        wrapper.__name__ = fn.__name__
        return wrapper
    members = {name: timed(phase, getattr(cls, name)) for phase, name in methods
               if callable(getattr(cls, name, None))}
    return type(cls.__name__, (cls,), {'__module__': cls.__module__, **members})


def _write_reference_files(folder, dataset, point) -> None:
    """The feature tables and the model's extra input files where the reference reads them."""
    for name, table in ((point.data.image_file, dataset.image_feat),
                        (point.data.text_file, dataset.text_feat)):
        if name and table is not None:  # an absent modality stays absent for it too
            np.save(folder / name, table)
    for field, name in reference.input_file_names(point).items():
        value = dataset.extra[field]
        if sp.issparse(value):  # a 'sparse' input file (`base.InputFile.kind`)
            sp.save_npz(folder / name, value)
        else:
            np.save(folder / name, value)


def _rewind(loader) -> None:
    """An MMRec TrainDataLoader stopped before its end starts its next pass from the beginning
    (it rewinds itself only when it runs out)."""
    for attr in ('pr', 'inter_pr'):
        if hasattr(loader, attr):
            setattr(loader, attr, 0)


def benchmark_reference(checkout, dataset, args, point, model_module: str, class_name: str,
                        repository: str, *,
                        unused_parameters: tuple = reference.UNUSED_REFERENCE_PARAMETERS,
                        methods=REFERENCE_GRAPH_METHODS,
                        graph_cache: Optional[ReferenceGraphCache] = None) -> dict:
    """Time the reference on `dataset` at our grid point `point`, phase by phase: its data
    loaders, its model's construction (the graph-building `methods` timed inside it), and
    per epoch its host work (`pre_epoch_processing` and the start of the loader's pass, which
    shuffles) and training, then one valid + test evaluation and `args.eval_repeats` more.

    `args.batches` = N > 0: each of `args.epochs` epochs trains only the loader's first N
    batches and the epoch is extrapolated as n_batches / N x measured (the loader is rewound
    for the next epoch). `args.reference_graph` ('auto', 'build', 'ours'; `dense_knn_plan`)
    decides, with `graph_cache`, whether the reference builds its kNN graph or reads ours.
    `args.on_phase`, if set, receives the phases after each.

    Returns:
      {'phases': {name: {'seconds', 'peak_rss_bytes'}}, 'n_batches', 'batches_timed',
       'epoch_measured_seconds', 'epoch_seconds', 'epoch_extrapolated', 'batch_seconds',
       'epoch_host_seconds', 'eval_seconds', 'eval_first_seconds', 'eval_repeats',
       'construct_seconds', 'parameters', 'graph'} (peak RSS: of this process, ours included
      when it ran here).
    """
    import torch
    from lirdrec_jax.bench import Phases, eval_repeats, timed_batches
    ref = reference.load_reference(checkout, model_module, class_name, repository)
    phases = Phases(getattr(args, 'on_phase', None), show=getattr(args, 'show_phases', True),
                    prefix='reference')
    repeats = eval_repeats(args)
    graph_note = None
    with tempfile.TemporaryDirectory(prefix='lirdrec_bench_ref_') as tmp:
        folder = Path(tmp) / dataset.name
        folder.mkdir()
        _write_reference_files(folder, dataset, point)
        if graph_cache is not None:
            feature_bytes = sum(f.nbytes for f in (dataset.image_feat, dataset.text_feat)
                                if f is not None)
            build, graph_note = dense_knn_plan(dataset.n_items, feature_bytes,
                                               getattr(args, 'reference_graph', 'auto'))
            if not build:
                write_graph_cache(folder / graph_cache.file_name,
                                  graph_cache.build(dataset, point))
        config = reference.reference_config(point, tmp + os.sep, dataset.name)
        torch.manual_seed(0)
        with phases.time('loaders'):
            train_data, valid_data, test_data = reference.reference_loaders(config, dataset)
        model_class = _with_timed_methods(ref.Model, methods, phases)
        with phases.time('construct'):
            model = model_class(config, train_data)
        with phases.time('trainer'):
            trainer = ref.Trainer(config, model)
        n_batches = (len(train_data) if hasattr(train_data, '__len__') else
                     math.ceil(dataset.train.users.size / int(point.train.batch_size)))
        n_timed = timed_batches(n_batches, int(getattr(args, 'batches', 0) or 0))
        measured, host = [], []
        for epoch in range(int(getattr(args, 'epochs', 1))):
            with phases.time('epoch_inputs'):
                start = time.perf_counter()
                model.pre_epoch_processing()
                batches = iter(train_data)
                host.append(time.perf_counter() - start)
            with phases.time('train'):
                start = time.perf_counter()
                trainer._train_epoch(itertools.islice(batches, n_timed), epoch)
                measured.append(time.perf_counter() - start)
            if n_timed < n_batches:
                _rewind(train_data)
            trainer.lr_scheduler.step()
        evals = []
        for r in range(repeats + 1):
            with phases.time('evaluate') if r == 0 else contextlib.nullcontext():
                start = time.perf_counter()
                trainer.evaluate(valid_data)
                trainer.evaluate(test_data)
                evals.append(time.perf_counter() - start)
    return {'phases': phases.as_dict(), 'n_batches': n_batches, 'batches_timed': n_timed,
            'epoch_measured_seconds': measured,
            'epoch_seconds': [n_batches / n_timed * m for m in measured],
            'epoch_extrapolated': n_timed < n_batches,
            'batch_seconds': min(measured) / n_timed, 'epoch_host_seconds': host,
            'eval_seconds': min(evals[1:]) if repeats else evals[0],
            'eval_first_seconds': evals[0], 'eval_repeats': repeats,
            'construct_seconds': phases.seconds('construct'), 'graph': graph_note,
            # Without the tables it registers but never reads (LIRDRec's feature copies,
            # docs/reference_quirks.md D4): the parameters that train, comparable with ours.
            'parameters': int(sum(p.numel() for name, p in model.named_parameters()
                                  if not name.startswith(tuple(unused_parameters))))}
