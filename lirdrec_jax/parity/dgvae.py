"""DGVAE's parity against enoche/DGVAE: the reference's own pipeline (code/dgvae.py,
code/dataset.py, not MMRec's framework) fed our data, its weights copied into ours, every
quantity that determines the numbers compared, then both trained on identical batches with
identical random draws.

The reference reads a folder of its own format; `stage_reference_inputs` writes it from our
dataset into a temporary folder: `<ds>.{train,valid,test}.ratings` (CSV `userID,itemID,rating`,
rating 1), `<ds>.uid.npy` / `<ds>.iid.npy` (0..n-1: only their lengths are read), `<ds>.vocab`
(JSON, only its length is read), `<ds>.user.words.tfidf.npz` (our word view) and the two
feature files. Its `dataset.get_data` / `build_item_adj` then build its matrices and graph.

Random draws are IMPORTED into the reference (shims in our process; its files are not
touched): its `gumbel_softmax`, its dropout layers and its `reparameterize` take our draws
(`models.dgvae.Noise`) in the order its forward consumes them. The kNN graph is the reference's
(dense) one on both sides from the graph check on, so that tied neighbour choices (both
correct) do not show up downstream.

Compatibility shims for current libraries (in our process only): `torch.Tensor.get_device()` is
-1 on the CPU and `DGVAE.__init__` calls `.to(item_adj.get_device())`, which current torch
rejects; during construction it reads 'cpu' instead. NumPy 2 removed `np.Inf`, which its
`predict` uses; the alias is restored (with `lirdrec_jax.parity.reference`'s other shims). The
reference's evaluation needs the `bottleneck` package (code/metrics.py); its scores
(`DGVAE.predict`) are compared instead, and both sides' scores are ranked by our evaluator.
"""
import argparse
import contextlib
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable, List

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from lirdrec_jax import evaluation, parallel, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import dgvae
from lirdrec_jax.parity import checks as C
from lirdrec_jax.parity import reference
from lirdrec_jax.parity.common import (KINK_STEPS, adam_step_checks, compare_sparse,
                                       imported_trainer, knn_tie_rows, numpy_of, our_adam_step,
                                       perturbed_copy)

MODEL = dgvae.MODEL
REFERENCE_REPO = 'enoche/DGVAE'

# Tolerances (float32 on both sides; docs/parity.md, DGVAE section).
TOL_GRAPH = 1e-6          # absolute, on graph entries (0.004 .. 0.1)
TOL_LOGITS = 1e-5         # times max|ref|, on forward logits and evaluation scores
TOL_LOSS = 1e-5           # relative, on a loss term
TOL_GRAD = 1e-4           # times max|grad| of the parameter
TOL_STEP = 1e-3           # times the learning rate, on parameters after one Adam step
TOL_METRIC = 1e-4         # one unit of the 4-decimal rounding
# The training-trajectory quantities (epoch losses, scores, metrics, parameters after the
# epochs) are judged against their measured noise floor (checks.floor_check): the reference
# trained again from its weights moved one ulp, on the same batches with the same draws.

STATE_KEYS = {  # reference state_dict key -> (our path, transposed)
    f'{net}.{key}': ((net,) + path, transposed)
    for net in ('cf_network', 'text_network')
    for key, path, transposed in (('encoder.weight', ('encoder', 'kernel'), True),
                                  ('encoder.bias', ('encoder', 'bias'), False),
                                  ('item_embeddings.weight', ('item_embeddings',), False),
                                  ('prototype_embeddings.weight', ('prototype_embeddings',),
                                   False))}


# ----------------------------------------------------------------------------------------------
# The reference side
# ----------------------------------------------------------------------------------------------

def reference_side(checkout) -> types.SimpleNamespace:
    """The reference's model and data modules, imported from the user's checkout (the folder
    holding code/dgvae.py)."""
    code = Path(checkout) / 'code'
    for name in ('dgvae.py', 'dataset.py', 'utils.py'):
        if not (code / name).is_file():
            raise reference.ReferenceError_(
                f'{code / name} not found: --reference must point at a clone of the reference '
                f'repository {REFERENCE_REPO} (the folder holding code/)')
    try:
        import pandas  # noqa: F401  (the reference's dataset.py reads with it)
        import torch  # noqa: F401
    except ImportError as err:
        raise reference.ReferenceError_(f'the reference needs {err.name}') from err
    for name in ('dgvae', 'dataset', 'utils'):
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, '__file__', '') or '').parent != code:
            raise reference.ReferenceError_(
                f'a module named {name!r} is already imported from {loaded.__file__}; the '
                f'reference\'s code/{name}.py cannot be imported in the same process')
    reference._install_shims()
    if not hasattr(np, 'Inf'):
        np.Inf = np.inf  # removed in NumPy 2.0; the reference's predict uses it
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    try:
        model_module = reference.import_reference_module('dgvae')
        data_module = reference.import_reference_module('dataset')
    except ImportError as err:
        raise reference.ReferenceError_(f'cannot import the reference from {code}: {err}') from err
    return types.SimpleNamespace(dgvae=model_module, dataset=data_module, source=code)


def stage_reference_inputs(dataset: MMRecDataset, folder: Path) -> Path:
    """Our dataset in the reference's format under `folder/<name>/`; returns that folder."""
    if dataset.image_feat is None or dataset.text_feat is None:
        raise ValueError(f'dataset {dataset.name!r}: the reference builds its item graph from '
                         'both image_feat.npy and text_feat.npy; one is absent')
    out = Path(folder) / dataset.name
    out.mkdir(parents=True, exist_ok=True)
    for split, name in ((dataset.train, 'train'), (dataset.valid, 'valid'),
                        (dataset.test, 'test')):
        rows = np.stack([split.users, split.items, np.ones_like(split.users)], axis=1)
        np.savetxt(out / f'{dataset.name}.{name}.ratings', rows.astype(np.int64), fmt='%d',
                   delimiter=',', header='userID,itemID,rating', comments='')
    np.save(out / f'{dataset.name}.uid.npy', np.arange(dataset.n_users))
    np.save(out / f'{dataset.name}.iid.npy', np.arange(dataset.n_items))
    words = sp.csr_matrix(dataset.extra[dgvae.WORDS_FIELD])
    with open(out / f'{dataset.name}.vocab', 'w', encoding='utf-8') as f:
        json.dump({f'w{j}': j for j in range(words.shape[1])}, f)
    sp.save_npz(out / f'{dataset.name}.user.words.tfidf.npz', words)
    np.save(out / 'image_feat.npy', np.asarray(dataset.image_feat, np.float32))
    np.save(out / 'text_feat.npy', np.asarray(dataset.text_feat, np.float32))
    return out


def reference_args(point_cfg, data_dir: Path, name: str) -> argparse.Namespace:
    """The fields of the reference's argparse namespace that its data functions read."""
    m = point_cfg.model
    return argparse.Namespace(dataset_dir=str(data_dir), dataset=name, knn_k=int(m.knn_k),
                              txt_weight=1.0 - float(m.mm_image_weight),
                              batch_size=int(point_cfg.train.batch_size))


@contextlib.contextmanager
def _cpu_get_device():
    """`Tensor.get_device()` reads 'cpu' for CPU tensors while the reference is built (its
    `.to(item_adj.get_device())` is -1 on the CPU, which current torch rejects)."""
    import torch
    original = torch.Tensor.get_device
    torch.Tensor.get_device = lambda self: 'cpu' if self.device.type == 'cpu' else original(self)
    try:
        yield
    finally:
        torch.Tensor.get_device = original


def build_reference_model(side, point_cfg, item_adj, n_items: int, n_words: int, seed: int):
    """The reference's DGVAE for one of our grid points (scalars), initialised from `seed`."""
    import torch
    m = point_cfg.model
    torch.manual_seed(seed)
    with _cpu_get_device():
        return side.dgvae.DGVAE(
            item_adj=item_adj, num_items=n_items, num_words=n_words, layers=[200],
            emb_size=int(m.embedding_size), dropout=float(m.dropout),
            num_prototypes=int(m.num_prototypes), tau=float(m.tau), nogb=False,
            rating_anneal_cap=float(m.rating_anneal_cap),
            text_anneal_cap=float(m.text_anneal_cap), std=float(m.std),
            text_std=float(m.text_std), reg_weights=[float(m.item_reg), float(m.prototype_reg)],
            rating_total_anneal_steps=int(m.rating_total_anneal_steps),
            text_total_anneal_steps=int(m.text_total_anneal_steps),
            lambda_text=float(m.lambda_text), lambda_reg=float(m.lambda_reg))


def import_state_dict(state_dict) -> dict:
    """The reference's state_dict (tensors or arrays) -> our params (numpy)."""
    params = {'cf_network': {'encoder': {}}, 'text_network': {'encoder': {}}}
    for key, (path, transposed) in STATE_KEYS.items():
        value = state_dict[key]
        value = numpy_of(value) if hasattr(value, 'detach') else np.asarray(value)
        node = params
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = np.ascontiguousarray(value.T if transposed else value)
    return params


def export_params(params) -> dict:
    """Our params (or gradients) -> {reference key: numpy array in its layout}."""
    out = {}
    for key, (path, transposed) in STATE_KEYS.items():
        value = params
        for p in path:
            value = value[p]
        value = np.asarray(value)
        out[key] = value.T if transposed else value
    return out


# ----------------------------------------------------------------------------------------------
# Imported random draws
# ----------------------------------------------------------------------------------------------

class ImportedNoise:
    """Makes the reference's forward consume given draws: its `fn.gumbel_softmax`, both
    networks' dropout layers and `reparameterize`. `load(noise)` queues one forward's draws
    (numpy arrays of the real rows); each consumer takes the next of its queue."""

    def __init__(self, side, model):
        import torch
        self.torch, self.model, self.side = torch, model, side
        self.gumbel, self.keep, self.eps = [], {}, {}
        functional = side.dgvae.fn
        noise = self

        class _Functional:
            def __getattr__(self, name):
                return getattr(functional, name)

            @staticmethod
            def gumbel_softmax(logits, tau=1.0, hard=False, dim=-1):
                # The reference's call: temperature 1, soft; its result is unused in eval mode.
                if not noise.gumbel:
                    return torch.softmax(logits, dim=dim)
                return torch.softmax((logits + noise.gumbel.pop(0)) / tau, dim=dim)

        self.functional = _Functional()
        for name in ('cf', 'text'):
            net = getattr(model, f'{name}_network')
            self.keep[name], self.eps[name] = [], []
            net.dropout_layer = self._dropout(net, name)
            net.reparameterize = self._reparameterize(net, name)

    def _dropout(self, net, name):
        torch, noise = self.torch, self

        class _Dropout(torch.nn.Module):
            def forward(self, x):
                if not self.training:
                    return x
                return x * (noise.keep[name].pop(0) / (1.0 - net.dropout))
        return _Dropout()

    def _reparameterize(self, net, name):
        def reparameterize(mu, logvar):
            if not net.training:
                return mu
            return mu + self.eps[name].pop(0) * self.torch.exp(0.5 * logvar)
        return reparameterize

    def load(self, noise: dgvae.Noise, rows: int) -> None:
        """Queue the draws of one forward of this model for its first `rows` batch rows (the
        reference module's `fn` is this model's until the next `load`)."""
        self.side.dgvae.fn = self.functional
        t = lambda a: self.torch.from_numpy(np.array(a, np.float32))
        self.gumbel = [t(noise.cf_gumbel), t(noise.text_gumbel)]
        for name in ('cf', 'text'):
            keep, eps = getattr(noise, f'{name}_keep'), getattr(noise, f'{name}_eps')
            self.keep[name] = [t(keep[k, :rows]) for k in range(keep.shape[0])]
            self.eps[name] = [t(eps[k, :rows]) for k in range(eps.shape[0])]

    def consumed(self) -> bool:
        return not self.gumbel and not any(self.keep.values()) and not any(self.eps.values())


# ----------------------------------------------------------------------------------------------
# Our side's compiled pieces
# ----------------------------------------------------------------------------------------------

@jax.jit
def _terms_and_grads(params, frozen, users, weights, noise, scalars, step):
    cf_rows = dgvae.gather_rows(frozen.ratings, users)
    x_text = dgvae.dense_rows(frozen.words, users)

    def total(p):
        terms = dgvae.loss_terms(p, cf_rows, x_text, weights, frozen.two_hop, noise, scalars,
                                 step)
        return terms.total, terms

    (_, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    out = dgvae.forward(params, cf_rows, x_text, frozen.two_hop, noise, scalars['tau'],
                        scalars['dropout'])
    return terms, out.cf_logits, out.text_logits, grads


_draw_noise = jax.jit(dgvae.draw_noise, static_argnums=(1, 2, 3))
_eval_embeddings = jax.jit(dgvae.eval_embeddings, static_argnums=(0, 6))
_scores = jax.jit(dgvae.score)


def _precomputed(users, items):
    """A score function for full-sort evaluation of precomputed (b, n_items) score rows."""
    del items
    return users


def our_scores(net, params, frozen, tau: float) -> np.ndarray:
    """(n_users, n_items) evaluation scores of our model."""
    users, items = _eval_embeddings(net, params, {'update': 0}, frozen, None,
                                    {'tau': jnp.float32(tau)}, 'last_batch')
    return np.asarray(_scores(users, items))


def reference_scores(model, x_cf, x_text, chunk: int = 512) -> np.ndarray:
    """(n_users, n_items) the reference's `predict` (training items at -inf), in eval mode."""
    import torch
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, x_cf.shape[0], chunk):
            rating, _ = model.predict(
                torch.from_numpy(x_cf[start:start + chunk].toarray().astype(np.float32)),
                torch.from_numpy(x_text[start:start + chunk].toarray().astype(np.float32)))
            out.append(rating.numpy())
    model.train()
    return np.concatenate(out)


def _metrics_of_scores(scores: np.ndarray, prepared, eval_cfg) -> tuple:
    """(valid, test) metrics of a (n_users, n_items) score matrix by our evaluator."""
    finite = np.where(np.isfinite(scores), scores, evaluation.MASK_SCORE).astype(np.float32)
    items = np.zeros(scores.shape[1], np.float32)
    out = []
    for split in (prepared.valid, prepared.test):
        out.append(evaluation.evaluate_full_sort(
            finite, items, split, metrics=tuple(eval_cfg.metrics), ks=tuple(eval_cfg.topk),
            score=_precomputed))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------

def run_parity(side, point_cfg, dataset: MMRecDataset, dataset_dir, *, epochs: int = 3,
               seed: int = 0, log: Callable[[str], None] = print) -> List[C.Check]:
    """All parity checks for one grid point; returns the checks (see `checks.report`)."""
    import torch
    del dataset_dir  # the reference reads the staged copy of our dataset
    m = point_cfg.model
    out: List[C.Check] = []
    with tempfile.TemporaryDirectory(prefix='dgvae_reference_') as staging:
        log('staging the reference\'s input files and building its data ...')
        stage_reference_inputs(dataset, Path(staging))
        args = reference_args(point_cfg, Path(staging), dataset.name)
        loaders, stats = side.dataset.get_data(args, binary=True, num_workers=0,
                                               train_shuffle=False)
        ref_train, ref_words = loaders[0].dataset.x, loaders[0].dataset.y
        ref_adj = side.dataset.build_item_adj(args).coalesce()
    prepared = train.prepare_data(dataset, MODEL.name)
    ours = prepared.model
    out.append(C.exact('counts: users, items, words', [dataset.n_users, dataset.n_items,
                                                       ours.words.shape[1]],
                       [stats['num_users'], stats['num_items'], stats['num_words']]))
    out.append(C.compare('user-item input rows (training-row counts)', ours.ratings.toarray(),
                         sp.csr_matrix(ref_train).toarray(), atol=0.0))
    out.append(C.compare('user word rows (TF-IDF)', ours.words.toarray(),
                         sp.csr_matrix(ref_words).toarray().astype(np.float32), atol=0.0))

    # The item graph, then the reference's graph on both sides.
    log('comparing the kNN item graph ...')
    frozen_host = MODEL.frozen_inputs(ours, dataset, m)
    idx = ref_adj.indices().numpy()
    ref_graph = sp.csr_matrix((ref_adj.values().double().numpy(), (idx[0], idx[1])),
                              shape=tuple(ref_adj.shape))
    ties = np.unique(np.concatenate([knn_tie_rows(f, int(m.knn_k))
                                     for f in (ours.image, ours.text)]))
    our_graph = dgvae.item_graph(ours, int(m.knn_k), float(m.mm_image_weight))
    out += compare_sparse('item-item kNN graph', our_graph, ref_graph, TOL_GRAPH,
                          allowed_rows=ties)
    # The reference's graph (float32, as it multiplies by it) for our two-hop rows from here on.
    frozen_host = frozen_host._replace(
        two_hop=dgvae.two_hop_rows(ref_graph.astype(np.float32).astype(np.float64)))
    frozen = MODEL.place_frozen(frozen_host, parallel.Partitioner(num_devices=1),
                                train.RunOptions())

    # Weights.
    n_words = int(ours.words.shape[1])
    ref_model = build_reference_model(side, point_cfg, ref_adj, dataset.n_items, n_words, seed)
    noise_import = ImportedNoise(side, ref_model)
    params = jax.tree.map(jnp.asarray, import_state_dict(ref_model.state_dict()))
    exported = export_params(params)
    out.append(C.exact('export: our params in the reference\'s state_dict layout',
                       np.concatenate([exported[k].ravel() for k in STATE_KEYS]),
                       np.concatenate([numpy_of(ref_model.state_dict()[k]).ravel()
                                       for k in STATE_KEYS])))
    net = MODEL.create(m, dataset.n_users, dataset.n_items)
    _, scalars = train.epoch_scalars(MODEL, point_cfg, {}, 0)
    sc = train.device_scalars(scalars)

    log('comparing evaluation scores ...')
    out += _score_checks('initial weights: ', ref_model, net, params, frozen, prepared, ours,
                         point_cfg)
    out += _single_step_checks(ref_model, noise_import, net, params, frozen, prepared, ours,
                               point_cfg, sc, seed, log)
    if epochs > 0:
        ref_model = build_reference_model(side, point_cfg, ref_adj, dataset.n_items, n_words,
                                          seed)
        twins = (ref_model, perturbed_copy(ref_model))
        out += _training_checks(side, twins, net, params, frozen_host, prepared, ours,
                                point_cfg, epochs, seed, log)
    del torch
    return out


def _rows(matrix: sp.csr_matrix, users: np.ndarray):
    import torch
    return torch.from_numpy(matrix[users].toarray().astype(np.float32))


def _ref_grads(model) -> dict:
    return {k: numpy_of(p.grad) for k, p in model.named_parameters() if p.grad is not None}


def _single_step_checks(ref_model, noise_import, net, params, frozen, prepared, ours,
                        point_cfg, sc, seed, log) -> List[C.Check]:
    """Forward, every loss term, gradients and one Adam step on the first batch of epoch 0."""
    import torch
    log('comparing the forward pass, loss terms, gradients and one Adam step ...')
    out: List[C.Check] = []
    batches = sampling.batch_kind(MODEL.batch_kind).draw(
        sampling.epoch_rng(seed, 0), prepared.sampler, int(point_cfg.train.batch_size))
    users, weights = batches.users[0], batches.weights[0]
    real = users[weights > 0]
    x_cf, x_text = _rows(ours.ratings, real), _rows(ours.words, real)
    noise = _draw_noise(jax.random.PRNGKey(seed), net, int(ours.words.shape[1]), users.size,
                        {k: float(v) for k, v in sc.items()})

    terms, cf_logits, text_logits, grads = _terms_and_grads(
        params, frozen, jnp.asarray(users), jnp.asarray(weights), noise, sc, jnp.float32(1.0))
    # The reference's parts, from one forward with the same draws (no update counted).
    noise_import.load(noise, real.size)
    with torch.no_grad():
        r_cf, r_text, r_mi, r_lv_cf, r_lv_text = ref_model.forward(x_cf, x_text)
    out.append(C.exact('imported draws: all consumed by one forward',
                       int(noise_import.consumed()), 1))
    n = real.size
    out.append(C.compare('forward: CF logits', np.asarray(cf_logits)[:n], numpy_of(r_cf),
                         atol=TOL_LOGITS, scale_atol_by_ref_max=True))
    out.append(C.compare('forward: text logits', np.asarray(text_logits)[:n], numpy_of(r_text),
                         atol=TOL_LOGITS, scale_atol_by_ref_max=True))
    cfn, tfn = ref_model.cf_network, ref_model.text_network
    parts = {'CF cross-entropy': (terms.cf_ce, cfn.calculate_ce_loss(x_cf, r_cf)),
             'CF KL': (terms.cf_kl, cfn.calculate_kl_loss(r_lv_cf)),
             'text cross-entropy': (terms.text_ce, tfn.calculate_ce_loss(x_text, r_text)),
             'text KL': (terms.text_kl, tfn.calculate_kl_loss(r_lv_text)),
             'mutual-information regulariser': (terms.mi, r_mi)}
    for name, (ours_v, ref_v) in parts.items():
        out.append(C.compare(f'loss term: {name}', float(ours_v), float(ref_v), atol=0,
                             rtol=TOL_LOSS))

    # The reference's loss (its update counter goes 0 -> 1, as our step 1), gradients, a step.
    ref_model.update = 0
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=float(point_cfg.optim.learning_rate))
    optimizer.zero_grad()
    noise_import.load(noise, real.size)
    loss = ref_model.calculate_loss(x_cf, x_text)
    loss.backward()
    out.append(C.compare('loss on one batch (KL weights at update 1)', float(terms.total),
                         loss.item(), atol=0, rtol=TOL_LOSS))
    ref_grads, our_grads = _ref_grads(ref_model), export_params(grads)
    for key in STATE_KEYS:
        out.append(C.compare(f'gradient {key}', our_grads[key], ref_grads[key], atol=TOL_GRAD,
                             scale_atol_by_ref_max=True))
    optimizer.step()
    lr = float(point_cfg.optim.learning_rate)
    after = export_params(our_adam_step(params, grads, point_cfg.optim.weight_decay, lr))
    ref_params = dict(ref_model.named_parameters())
    return out + adam_step_checks(ref_params, our_grads, ref_grads, after, ref_params, lr,
                                  TOL_STEP)


def _score_checks(prefix: str, ref_model, net, params, frozen, prepared, ours, point_cfg
                  ) -> List[C.Check]:
    """Evaluation scores (eval mode) of both sides, and the metrics our evaluator computes from
    each side's scores."""
    ref = reference_scores(ref_model, ours.ratings, ours.words)
    mine = our_scores(net, params, frozen, float(point_cfg.model.tau))
    unmasked = np.isfinite(ref)
    # |d| <= TOL_LOGITS * max|ref| over the unmasked entries (the masked ones are -inf there).
    scale = float(np.abs(ref[unmasked]).max())
    out = [C.compare(f'{prefix}evaluation scores (training items excluded)',
                     np.where(unmasked, mine, 0.0), np.where(unmasked, ref, 0.0),
                     atol=TOL_LOGITS * scale,
                     note=f'{int((~unmasked).sum())} masked entries not compared')]
    ours_m = _metrics_of_scores(mine, prepared, point_cfg.eval)
    ref_m = _metrics_of_scores(ref, prepared, point_cfg.eval)
    for name, a, b in zip(('valid', 'test'), ours_m, ref_m):
        out.append(C.metrics_check(f'{prefix}{name} metrics of the scores', a, b, TOL_METRIC))
    return out


def _training_checks(side, twins, net, params, frozen_host, prepared, ours, point_cfg,
                     epochs, seed, log) -> List[C.Check]:
    """Both sides trained on identical batches with identical draws for `epochs` epochs: our
    trainer's compiled epoch, the reference's `calculate_loss` + Adam per batch; `twins` = (the
    reference, its copy with every weight moved one ulp), whose separation is the floor."""
    import torch
    t, lr = point_cfg.train, float(point_cfg.optim.learning_rate)
    out: List[C.Check] = []
    setup, fns, partitioner = imported_trainer(MODEL, point_cfg, prepared, net, params,
                                               frozen_host, seed)
    options, frozen, state, key = setup.options, setup.frozen, setup.state, setup.key
    imports = [ImportedNoise(side, model) for model in twins]
    optimizers = [torch.optim.Adam(model.parameters(), lr=lr) for model in twins]
    for model in twins:
        model.update = 0
    host = MODEL.host_init(point_cfg.model)
    for epoch in range(epochs):
        log(f'training epoch {epoch} on both sides and the perturbed reference ...')
        host, scalars = train.epoch_scalars(MODEL, point_cfg, host, epoch)
        sc = train.device_scalars(scalars)
        batches = sampling.batch_kind(MODEL.batch_kind).draw(
            sampling.epoch_rng(seed, epoch), prepared.sampler, int(t.batch_size))
        epoch_key = jax.random.fold_in(key, epoch)  # as the trainer folds the point's key
        ref_losses = [0.0, 0.0]
        for b in range(batches.users.shape[0]):
            users, weights = batches.users[b], batches.weights[b]
            real = users[weights > 0]
            # The draws of our step b: the trainer's key for the step, our `draw_noise`.
            noise = _draw_noise(jax.random.fold_in(epoch_key, b), net,
                                int(ours.words.shape[1]), users.size, scalars)
            x_cf, x_text = _rows(ours.ratings, real), _rows(ours.words, real)
            for i, (model, imported, opt) in enumerate(zip(twins, imports, optimizers)):
                imported.load(noise, real.size)
                opt.zero_grad()
                loss = model.calculate_loss(x_cf, x_text)
                loss.backward()
                opt.step()
                ref_losses[i] += loss.item()
        state = fns.start_epoch(state, None)
        state, step_losses = train.run_epoch(fns, state, batches, frozen, None, sc, epoch_key,
                                             None, epoch, partitioner, options.scan_epoch)
        loss = train.summed_loss(step_losses, epoch)
        out.append(C.floor_check(f'epoch {epoch}: summed training loss', loss, ref_losses[0],
                                 ref_losses[1], minimum=TOL_LOSS * abs(ref_losses[0])))
        out += _trajectory_score_checks(f'epoch {epoch}: ', twins, net, state.params, frozen,
                                        prepared, ours, point_cfg)
    out.append(C.exact('update counters after training', int(state.carry['update']),
                       twins[0].update))
    ours_p = export_params(state.params)
    ref_p, perturbed_p = (dict(m.named_parameters()) for m in twins)
    # The minimum: an element whose gradient is at rounding level moves by up to two opposite
    # Adam steps between two correct runs (common.KINK_STEPS learning rates).
    for k in STATE_KEYS:
        out.append(C.floor_check(f'parameters after {epochs} epochs: {k}', ours_p[k],
                                 numpy_of(ref_p[k]), numpy_of(perturbed_p[k]),
                                 minimum=KINK_STEPS * lr))
    return out


def _trajectory_score_checks(prefix: str, twins, net, params, frozen, prepared, ours,
                             point_cfg) -> List[C.Check]:
    """Scores and metrics of ours against the reference's, with the perturbed reference's as
    the floor."""
    ref, perturbed = (reference_scores(m, ours.ratings, ours.words) for m in twins)
    mine = our_scores(net, params, frozen, float(point_cfg.model.tau))
    unmasked = np.isfinite(ref)
    keep = lambda a: np.where(unmasked, a, 0.0)
    scale = float(np.abs(ref[unmasked]).max())
    out = [C.floor_check(f'{prefix}evaluation scores (training items excluded)', keep(mine),
                         keep(ref), keep(perturbed), minimum=TOL_LOGITS * scale)]
    metrics = [_metrics_of_scores(x, prepared, point_cfg.eval) for x in (mine, ref, perturbed)]
    for i, name in enumerate(('valid', 'test')):
        out.append(C.floor_metrics_check(f'{prefix}{name} metrics', metrics[0][i],
                                         metrics[1][i], metrics[2][i], minimum=TOL_METRIC))
    return out
