"""Parity machinery shared by every model's parity module: sparse-matrix and top-k comparisons,
torch <-> numpy helpers, the reference side's interface. Model-specific check sequences live in
`lirdrec_jax/parity/<model>.py`."""
from typing import Callable, List, NamedTuple, Optional

import numpy as np
import scipy.sparse as sp

from lirdrec_jax import evaluation, sampling
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


def reference_grads_in_float64(model, loss_of: Callable) -> dict:
    """The gradients of `loss_of(copy)` for a float64 copy of a torch model: its parameters and
    every float32 tensor it holds as a plain attribute (graphs, features, cached state). The
    arbiter when a float32 gradient of ours and of the reference differ: both are compared
    with the reference's own math without float32 rounding."""
    import copy
    import torch
    # Tensors cached with autograd history (the last forward's) cannot be deep-copied: copy
    # their values (the model itself is left untouched).
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if torch.is_tensor(value) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    twin = copy.deepcopy(model, memo).double()
    for module in twin.modules():
        for name, value in list(vars(module).items()):
            if torch.is_tensor(value) and value.dtype == torch.float32:
                setattr(module, name, value.double())
    twin.zero_grad()
    loss_of(twin).backward()
    return {k: p.grad.detach().numpy() for k, p in twin.named_parameters() if p.grad is not None}


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
