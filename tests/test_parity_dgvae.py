"""DGVAE (lirdrec_jax/models/dgvae.py) against an independent PyTorch statement
(tests/torch_dgvae.py) with the same random draws: the forward logits, every loss term, the
gradients, one Adam step, three steps with the annealing counter, the evaluation scores; and
perturbed statements that the same comparison must reject."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from lirdrec_jax import optim, train  # noqa: E402
from lirdrec_jax.models import dgvae  # noqa: E402
from tests import torch_dgvae  # noqa: E402
from tests.test_dgvae import N_WORDS, SCALARS, tiny, tiny_graph  # noqa: E402

USERS = [3, 1, 6, 5, 0]  # the last row is padding (weight 0); user 6 has no training rows
WEIGHTS = [1.0, 1.0, 1.0, 1.0, 0.0]
REAL = 4
LR = 1e-3
# float32 on both sides, different summation orders (sparse vs dense graph, logsumexp vs the
# reference's exp-sum-log): each value agrees to RTOL of itself or to SCALE of the largest
# value of its array (gradients cancel: an entry of 0.1 among entries of 7 carries the
# rounding of the large ones). Measured: differences below 2e-6 of the largest value.
RTOL, SCALE = 1e-5, 1e-5
HP = {k: float(v) for k, v in SCALARS.items()}


@jax.jit
def terms_and_grads(params, frozen, users, weights, noise, step):
    s = {k: jnp.float32(v) for k, v in SCALARS.items()}
    cf_rows = dgvae.gather_rows(frozen.ratings, users)
    x_text = dgvae.dense_rows(frozen.words, users)

    def total(p):
        terms = dgvae.loss_terms(p, cf_rows, x_text, weights, frozen.two_hop, noise, s, step)
        return terms.total, terms

    (_, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    out = dgvae.forward(params, cf_rows, x_text, frozen.two_hop, noise, s['tau'], s['dropout'])
    return terms, out.cf_logits, out.text_logits, grads


OPTIMIZER = optim.create_optimizer()


@jax.jit
def adam_step(params, grads, opt_state):
    return train.apply_gradients(OPTIMIZER, params, opt_state, grads, jnp.float32(LR))


# ----------------------------------------------------------------------------------------------
# The torch side
# ----------------------------------------------------------------------------------------------

VIEW_KEYS = {'kernel': ('encoder', 'kernel'), 'bias': ('encoder', 'bias'),
             'items': ('item_embeddings',), 'prototypes': ('prototype_embeddings',)}


def to_torch_params(params) -> dict:
    """{'cf': view, 'text': view} of leaf tensors that require gradients."""
    out = {}
    for side, name in (('cf', 'cf_network'), ('text', 'text_network')):
        view = {}
        for key, path in VIEW_KEYS.items():
            value = params[name]
            for p in path:
                value = value[p]
            view[key] = torch.tensor(np.asarray(value), requires_grad=True)
        out[side] = view
    return out


def as_ours(tensors: dict) -> dict:
    """The torch views in our parameter layout (numpy)."""
    out = {}
    for side, name in (('cf', 'cf_network'), ('text', 'text_network')):
        t = {k: v.detach().numpy() for k, v in tensors[side].items()}
        out[name] = {'encoder': {'kernel': t['kernel'], 'bias': t['bias']},
                     'item_embeddings': t['items'], 'prototype_embeddings': t['prototypes']}
    return out


def torch_inputs(frozen):
    rows = np.asarray(USERS[:REAL])
    x_cf = dgvae.dense_rows(frozen.ratings, jnp.asarray(rows, jnp.int32))
    x_text = dgvae.dense_rows(frozen.words, jnp.asarray(rows, jnp.int32))
    g = tiny_graph().toarray().astype(np.float32)  # the reference's dense G
    return (torch.from_numpy(np.array(x_cf)), torch.from_numpy(np.array(x_text)),
            torch.from_numpy(g))


def torch_noise(noise) -> dict:
    """Our draws for the real rows, as the statement takes them."""
    n = {k: np.array(v) for k, v in noise._asdict().items()}
    return {'cf_gumbel': torch.from_numpy(n['cf_gumbel']),
            'text_gumbel': torch.from_numpy(n['text_gumbel']),
            **{k: torch.from_numpy(np.ascontiguousarray(n[k][:, :REAL]))
               for k in ('cf_keep', 'text_keep', 'cf_eps', 'text_eps')}}


def torch_terms(statement, tensors, frozen, noise, step):
    x_cf, x_text, g = torch_inputs(frozen)
    terms = statement.loss(tensors['cf'], tensors['text'], x_cf, x_text, g, HP,
                           torch_noise(noise), step)
    out = statement.forward(tensors['cf'], tensors['text'], x_cf, x_text, g, HP,
                            torch_noise(noise))
    return terms, out


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------

def compare(ours, theirs, what: str) -> None:
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=RTOL,
                               atol=SCALE * float(np.abs(theirs).max()) + 1e-7, err_msg=what)


def check_one_step(statement, params, frozen, noise, step) -> None:
    """Forward, loss terms and gradients of one batch agree with `statement`."""
    terms, cf_logits, text_logits, grads = terms_and_grads(
        params, frozen, jnp.asarray(USERS, jnp.int32), jnp.asarray(WEIGHTS), noise,
        jnp.float32(step))
    tensors = to_torch_params(params)
    t_terms, t_out = torch_terms(statement, tensors, frozen, noise, step)
    compare(cf_logits[:REAL], t_out['cf_logits'].detach(), 'cf logits')
    compare(text_logits[:REAL], t_out['text_logits'].detach(), 'text logits')
    for name in ('cf_ce', 'cf_kl', 'text_ce', 'text_kl', 'mi', 'total'):
        compare(getattr(terms, name), t_terms[name].detach(), name)
    t_terms['total'].backward()
    t_grads = as_ours({side: {k: v.grad for k, v in view.items()}
                       for side, view in tensors.items()})
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: compare(a, b, f'gradient {jax.tree_util.keystr(path)}'),
        grads, t_grads)


def noise_for(key):
    net, _, _ = tiny()
    return jax.jit(dgvae.draw_noise, static_argnums=(1, 2, 3))(key, net, N_WORDS, len(USERS),
                                                               SCALARS)


def test_forward_loss_terms_and_gradients_match_the_torch_statement():
    _, params, frozen = tiny()
    check_one_step(torch_dgvae, params, frozen, noise_for(jax.random.PRNGKey(11)), 1)


def test_adam_steps_with_annealing_match_torch():
    """Three steps with fresh draws each (the KL weights follow the step counter), then
    the parameters of both sides agree."""
    _, params, frozen = tiny()
    tensors = to_torch_params(params)
    opt = torch.optim.Adam([t for view in tensors.values() for t in view.values()], lr=LR)
    opt_state = OPTIMIZER.init(params)
    for step in (1, 2, 3):
        noise = noise_for(jax.random.PRNGKey(100 + step))
        _, _, _, grads = terms_and_grads(params, frozen, jnp.asarray(USERS, jnp.int32),
                                         jnp.asarray(WEIGHTS), noise, jnp.float32(step))
        params, opt_state = adam_step(params, grads, opt_state)
        opt.zero_grad()
        t_terms, _ = torch_terms(torch_dgvae, tensors, frozen, noise, step)
        t_terms['total'].backward()
        opt.step()
        jax.tree_util.tree_map_with_path(
            lambda path, a, b: compare(a, b, f'step {step} {jax.tree_util.keystr(path)}'),
            params, as_ours(tensors))


def test_evaluation_scores_match_the_eval_mode_statement():
    net, params, frozen = tiny()
    users, items = jax.jit(dgvae.eval_embeddings, static_argnums=(0, 6))(
        net, params, {'update': 0}, frozen, None, {'tau': jnp.float32(HP['tau'])}, 'last_batch')
    scores = jax.jit(dgvae.score)(users, items)
    rows = jnp.arange(net.n_users, dtype=jnp.int32)
    x_cf = torch.from_numpy(np.array(dgvae.dense_rows(frozen.ratings, rows)))
    x_text = torch.from_numpy(np.array(dgvae.dense_rows(frozen.words, rows)))
    g = torch.from_numpy(tiny_graph().toarray().astype(np.float32))
    tensors = to_torch_params(params)
    with torch.no_grad():
        want = torch_dgvae.forward(tensors['cf'], tensors['text'], x_cf, x_text, g, HP)
    compare(scores, want['cf_logits'], 'evaluation scores')


# ----------------------------------------------------------------------------------------------
# Must fail: perturbed statements
# ----------------------------------------------------------------------------------------------

class _Perturbed:
    """torch_dgvae with some of its functions replaced: every function of the module is
    re-created over one shared namespace, so the others call the replacements."""

    def __init__(self, **replace):
        import types
        namespace = dict(vars(torch_dgvae))
        for name, value in vars(torch_dgvae).items():
            if isinstance(value, types.FunctionType):
                namespace[name] = types.FunctionType(value.__code__, namespace, name,
                                                     value.__defaults__, value.__closure__)
        namespace.update(replace)
        self.__dict__.update(namespace)


def _mi_including_the_positive_pair(xs, ys):
    K = len(xs)
    sp = torch.nn.functional.softplus
    total = 0.0
    for i in range(K):
        e_n = sum(sp((xs[i] * ys[j]).sum(dim=1)) for j in range(K)) / K  # j == i included
        total = total + (e_n + sp(-(xs[i] * ys[i]).sum(dim=1))).mean()
    return total / K


def _kl_with_mean_over_factors(logvars):
    return torch_dgvae.kl(logvars) / len(logvars)


def _attention_without_centring(queries, keys, values):
    K = len(queries)
    return [sum(torch.tanh((queries[i] * keys[j]).sum(dim=1))[:, None]
                * torch.sigmoid(-(queries[i] - keys[j]).abs().sum(dim=1))[:, None] * values[j]
                for j in range(K)) for i in range(K)]


@pytest.mark.parametrize('replace', [
    {'mutual_information': _mi_including_the_positive_pair},
    {'kl': _kl_with_mean_over_factors},
    {'attend': _attention_without_centring},
], ids=['mi_with_positive_pair', 'kl_mean_over_factors', 'attention_not_centred'])
def test_a_perturbed_statement_is_rejected(replace):
    _, params, frozen = tiny()
    with pytest.raises(AssertionError):
        check_one_step(_Perturbed(**replace), params, frozen,
                       noise_for(jax.random.PRNGKey(11)), 1)


# ----------------------------------------------------------------------------------------------
# The parity module's data staging and name table (no reference checkout needed)
# ----------------------------------------------------------------------------------------------

def test_staged_folder_is_what_the_reference_reads(tmp_path):
    import json
    import scipy.sparse as sp
    from lirdrec_jax.data import Interactions, MMRecDataset
    from lirdrec_jax.model_inputs import as_mapping
    from lirdrec_jax.parity import dgvae as parity_dgvae
    words = sp.csr_matrix(np.array([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
                                   np.float32))
    split = lambda u, i: Interactions(np.array(u, np.int32), np.array(i, np.int32))
    ds = MMRecDataset('tiny', 3, 4, split([0, 0, 1, 1, 0], [0, 1, 2, 3, 0]), split([0], [2]),
                      split([1], [0]), np.ones((4, 2), np.float32), np.ones((4, 3), np.float32),
                      as_mapping({'words_file': words}))
    folder = parity_dgvae.stage_reference_inputs(ds, tmp_path)
    # The reference's read_rating_file: pd.read_csv(path).values, a header line, then columns
    # uid, iid, rating (read here with numpy: pandas is only in the parity extra).
    def ratings(name):
        with open(folder / name, encoding='utf-8') as f:
            header = f.readline().strip().split(',')
            return header, np.loadtxt(f, delimiter=',', dtype=np.int64, ndmin=2)
    header, train_rows = ratings('tiny.train.ratings')
    assert len(header) == 3
    np.testing.assert_array_equal(train_rows, [[0, 0, 1], [0, 1, 1], [1, 2, 1], [1, 3, 1],
                                               [0, 0, 1]])
    assert ratings('tiny.test.ratings')[1].tolist() == [[1, 0, 1]]
    assert len(np.load(folder / 'tiny.uid.npy')) == 3 and len(np.load(folder / 'tiny.iid.npy')) == 4
    assert len(json.load(open(folder / 'tiny.vocab', encoding='utf-8'))) == 3
    assert (sp.load_npz(folder / 'tiny.user.words.tfidf.npz') != words).nnz == 0
    # The name table: our params -> the reference's state_dict layout and back.
    _, params, _ = tiny()
    exported = parity_dgvae.export_params(params)
    assert exported['cf_network.encoder.weight'].shape == (2 * 4, 9)  # nn.Linear: (out, in)
    back = parity_dgvae.import_state_dict(exported)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
