"""FREEDOM (lirdrec_jax/models/freedom.py) against an independent dense PyTorch statement
(tests/torch_freedom.py), its pruning sampler against numpy and exact probabilities, and its
config checks."""
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

from configs import freedom as freedom_configs  # noqa: E402
from lirdrec_jax import graph, parallel  # noqa: E402
from lirdrec_jax.data import Interactions, MMRecDataset  # noqa: E402
from lirdrec_jax.models import base, freedom  # noqa: E402
from tests import torch_freedom  # noqa: E402
from tests.mixed_precision import (assert_close_not_equal, assert_training_close,  # noqa: E402
                                   assert_matmul_dtype_checks, bfloat16_dots,
                                   first_steps_by_dtype)
from tests.mixed_precision import tensor as hlo_type  # noqa: E402  (`tensor` names torch's)

N_USERS, N_ITEMS, DIM = 6, 7, 8
# Training rows; (2, 3) occurs twice (a repeated row: it counts once, in the full adjacency and
# in the pruning's edges, as the reference's deduplicated COO matrix). Item 6 never occurs in
# training.
TRAIN = np.array([(0, 0), (0, 1), (0, 2), (1, 1), (1, 3), (2, 3), (2, 3), (2, 4), (3, 0),
                  (3, 5), (4, 2), (4, 4), (4, 5), (5, 1), (5, 0)])
BATCH_USERS, BATCH_POS, BATCH_NEG = [0, 2, 4, 5, 3], [1, 3, 5, 0, 0], [6, 0, 1, 3, 4]
LR = 1e-3


class Batch(NamedTuple):
    users: jax.Array
    positives: jax.Array
    negatives: jax.Array
    weights: jax.Array


# Jitted once for the whole file: eager dispatch compiles every small op separately, which
# costs more than the tests themselves.
forward = jax.jit(freedom.forward, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(net, params, batch, frozen, user_item, reg_weight):
    """The interface's loss on `user_item` (the epoch input), and its parameter gradients."""
    return jax.value_and_grad(lambda p: freedom.MODEL.loss(
        net, p, (), batch, frozen, user_item, {'reg_weight': reg_weight}, None)[0])(params)


ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


@jax.jit
def adam_step(params, grads, state, lr):
    """Adam with PyTorch's constants, scaled by -lr."""
    updates, state = ADAM.update(grads, state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates)), state


class Options(NamedTuple):
    spmm_impl: str = 'bcoo'
    spmm_chunk_size: int = 0


def model_config(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(embedding_size=DIM, knn_k=3, n_ui_layers=2, n_mm_layers=1,
                                       mm_image_weight=0.3, dropout=0.5, reg_weight=0.1))
    m.update(overrides)
    return m


def dataset(image=True, text=True) -> MMRecDataset:
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((N_ITEMS, 10)).astype(np.float32) if image else None,
             rng.standard_normal((N_ITEMS, 5)).astype(np.float32) if text else None)
    train = Interactions(TRAIN[:, 0].astype(np.int32), TRAIN[:, 1].astype(np.int32))
    empty = Interactions(np.zeros(0, np.int32), np.zeros(0, np.int32))
    return MMRecDataset('tiny', N_USERS, N_ITEMS, train, empty, empty, *feats)


@pytest.fixture(scope='module')
def setup():
    ds = dataset()
    cfg = model_config()
    prepared = freedom.prepare(ds)
    host = freedom.frozen_inputs(prepared, ds, cfg)
    partitioner = parallel.Partitioner(num_devices=1)
    frozen = freedom.place_frozen(host, partitioner, Options())
    net = freedom.create(cfg, N_USERS, N_ITEMS)
    params, carry = freedom.init(jax.random.PRNGKey(0), net, frozen, host)
    params = partitioner.replicate(params)  # as the trainer places them (no recompiles later)
    pruned = freedom.epoch_inputs(prepared, cfg, jax.random.PRNGKey(14), 0)
    keep = freedom.keep_count(int(prepared.edges.users.shape[0]), cfg.dropout)
    kept = np.asarray(pruned.indices[:keep])
    batch = Batch(*(jnp.asarray(a + a[:1], jnp.int32) for a in (BATCH_USERS, BATCH_POS, BATCH_NEG)),
                  jnp.asarray([1.0] * len(BATCH_USERS) + [0.0]))  # one padding row
    return dict(ds=ds, cfg=cfg, prepared=prepared, host=host, frozen=frozen, net=net,
                params=params, carry=carry, pruned=pruned, kept_users=kept[:, 0],
                kept_items=kept[:, 1] - N_USERS, batch=batch)


def torch_model(s, layer_mean=True) -> torch_freedom.TorchFREEDOM:
    m = s['cfg']
    t = torch_freedom.TorchFREEDOM(N_USERS, N_ITEMS, DIM, m.n_ui_layers, m.n_mm_layers,
                                   s['ds'].image_feat, s['ds'].text_feat, m.knn_k,
                                   m.mm_image_weight, m.reg_weight, layer_mean=layer_mean)
    t.load_params(s['params'])
    return t


def torch_pruned(s) -> torch.Tensor:
    return torch_freedom.dense_pruned_adjacency(s['kept_users'], s['kept_items'], N_USERS, N_ITEMS)


def torch_loss(t, s):
    u, p, n = (torch.as_tensor(a) for a in (BATCH_USERS, BATCH_POS, BATCH_NEG))
    return t.loss(torch_pruned(s), u, p, n)


def flat(params) -> dict:
    return {'/'.join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def close(a, b, tol=1e-5):
    """Equal to float32 rounding: within tol of each entry and of b's largest entry."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


# ----------------------------------------------------------------------------------------------
# Against the dense PyTorch statement
# ----------------------------------------------------------------------------------------------

def test_graphs_match_dense_statement(setup):
    s = setup
    kept = list(zip(s['kept_users'].tolist(), s['kept_items'].tolist()))
    assert len(kept) == len(set(kept)) == 7  # int(14 * 0.5) distinct edges
    full = torch_freedom.dense_norm_adjacency(TRAIN[:, 0], TRAIN[:, 1], N_USERS, N_ITEMS)
    np.testing.assert_allclose(np.asarray(s['frozen'].user_item.todense()), full.numpy(),
                               rtol=1e-6, atol=1e-7)
    t = torch_model(s)
    np.testing.assert_allclose(np.asarray(s['frozen'].item_item.todense()), t.item_graph.numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s['pruned'].todense()), torch_pruned(s).numpy(),
                               rtol=1e-6, atol=1e-7)
    weights = torch_freedom.sampling_weights(TRAIN[:, 0], TRAIN[:, 1], N_USERS, N_ITEMS)
    np.testing.assert_allclose(np.asarray(s['prepared'].edges.weights), weights.numpy(),
                               rtol=1e-6)


def test_pruning_draws_from_the_distinct_pairs_sorted_like_the_reference():
    edges = graph.train_edges(TRAIN[:, 0], TRAIN[:, 1], N_USERS, N_ITEMS)
    pairs = sorted(set(map(tuple, TRAIN.tolist())))  # the repeated row (2, 3) once
    assert list(zip(np.asarray(edges.users).tolist(), np.asarray(edges.items).tolist())) == pairs
    # Degrees count distinct pairs: user 2 has items 3 and 4, item 3 has users 1 and 2.
    at = pairs.index((2, 3))
    np.testing.assert_allclose(float(edges.weights[at]), 1 / np.sqrt(2 * 2), rtol=1e-6)


def test_forward_matches_torch_on_pruned_and_full_graph(setup):
    s = setup
    t = torch_model(s)
    users, items = forward(s['net'], s['params'], s['pruned'], s['frozen'].item_item)
    tu, ti = t.forward(torch_pruned(s))
    assert users.shape == (N_USERS, DIM) and items.shape == (N_ITEMS, DIM)
    assert close(users, tu.detach()) and close(items, ti.detach())
    # Evaluation: a fresh forward on the FULL adjacency, whatever the epoch's graph.
    eu, ei = freedom.eval_embeddings(s['net'], s['params'], (), s['frozen'], s['pruned'], {}, None)
    full = torch_freedom.dense_norm_adjacency(TRAIN[:, 0], TRAIN[:, 1], N_USERS, N_ITEMS)
    fu, fi = t.forward(full)
    assert close(eu, fu.detach()) and close(ei, fi.detach())
    assert not close(eu, tu.detach())  # the two graphs give different embeddings


def test_sum_over_layers_fails_the_comparison(setup):
    """The comparison can fail: the statement with a sum over layers instead of the mean."""
    s = setup
    users, _ = forward(s['net'], s['params'], s['pruned'], s['frozen'].item_item)
    tu, _ = torch_model(s, layer_mean=False).forward(torch_pruned(s))
    assert not close(users, tu.detach())
    assert np.abs(np.asarray(users) - tu.detach().numpy()).max() > 1e-3


def test_loss_gradients_and_adam_step_match_torch(setup):
    s = setup
    value, grads = loss_and_grads(s['net'], s['params'], s['batch'], s['frozen'], s['pruned'],
                                  s['cfg'].reg_weight)
    t = torch_model(s)
    tloss = torch_loss(t, s)
    tloss.backward()
    assert float(value) == pytest.approx(tloss.item(), rel=1e-5)

    ours, theirs = flat(grads), torch_freedom.named_tensors(t)
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        ref = torch_freedom.from_torch_layout(tensor.grad, key)
        assert ours[key].shape == ref.shape, key
        if key.endswith('_trs/bias'):
            # The bias cancels in every BPR margin, u.(Wp + b) - u.(Wn + b): its gradient is
            # zero up to rounding on both sides, i.e. noise (the reference's Adam then moves it
            # by noise only; the bias never changes a loss or a score).
            assert np.abs(ours[key]).max() < 1e-6 and np.abs(ref).max() < 1e-6, key
        else:
            assert close(ours[key], ref), key
    # Feature rows outside the batch get no gradient, the batch's rows do.
    g = ours['text_embedding']
    touched = sorted(set(BATCH_POS) | set(BATCH_NEG))
    assert np.all(g[[i for i in range(N_ITEMS) if i not in touched]] == 0)
    assert np.all(np.abs(g[touched]).sum(1) > 0)

    # One Adam step each: torch.optim.Adam against optax's PyTorch-constant Adam.
    stepped = flat(adam_step(s['params'], grads, ADAM.init(s['params']), LR)[0])
    opt = torch.optim.Adam(t.parameters(), lr=LR)
    opt.step()
    for key, tensor in theirs.items():
        if key.endswith('_trs/bias'):
            continue  # zero gradient in exact arithmetic: Adam scales its rounding noise (below)
        ref = torch_freedom.from_torch_layout(tensor, key)
        moved = ref - flat(s['params'])[key]
        # Every entry with a gradient moves by about lr (Adam's first step); compare the moves.
        np.testing.assert_allclose(stepped[key] - flat(s['params'])[key], moved, rtol=1e-3,
                                   atol=LR * 1e-3, err_msg=key)


def test_reg_weight_scales_the_feature_terms(setup):
    s = setup

    def value(reg):
        return float(loss_and_grads(s['net'], s['params'], s['batch'], s['frozen'], s['pruned'],
                                    reg)[0])

    t = torch_model(s)
    t.reg_weight = 0.0
    assert value(0.0) == pytest.approx(torch_loss(t, s).item(), rel=1e-5)
    assert value(1.0) - value(0.0) == pytest.approx(10 * (value(0.1) - value(0.0)), rel=1e-4)


def test_one_modality(setup):
    """Text only: no image parameters, one feature term, the kNN graph of the text alone."""
    ds = dataset(image=False)
    cfg = model_config()
    prepared = freedom.prepare(ds)
    host = freedom.frozen_inputs(prepared, ds, cfg)
    net = setup['net']
    params = {k: v for k, v in setup['params'].items() if not k.startswith('image')}
    assert freedom.modalities(params) == ('text',) and 'image_trs' not in params
    t = torch_freedom.TorchFREEDOM(N_USERS, N_ITEMS, DIM, 2, 1, None, ds.text_feat, 3, 0.3, 0.1)
    t.load_params(params)
    np.testing.assert_allclose(np.asarray(host.item_item.todense()), t.item_graph.numpy(),
                               rtol=1e-6, atol=1e-7)
    s = dict(setup, params=params)
    value, _ = loss_and_grads(net, params, setup['batch'], host, setup['pruned'], 0.1)
    assert float(value) == pytest.approx(torch_loss(t, s).item(), rel=1e-5)


def test_prepare_needs_a_feature_file():
    with pytest.raises(ValueError, match='image_file / data.text_file'):
        freedom.prepare(dataset(image=False, text=False))


# ----------------------------------------------------------------------------------------------
# Interface details
# ----------------------------------------------------------------------------------------------

def test_init_copies_features_and_matches_torch_distributions(setup):
    s = setup
    assert s['carry'] == ()
    np.testing.assert_array_equal(np.asarray(s['params']['image_embedding']), s['ds'].image_feat)
    np.testing.assert_array_equal(np.asarray(s['params']['text_embedding']), s['ds'].text_feat)
    assert s['params']['image_trs']['kernel'].shape == (10, DIM)
    assert s['params']['text_trs']['bias'].shape == (DIM,)
    # On tables big enough to see the distributions:
    rng = np.random.default_rng(3)
    net = freedom.FreedomNet(n_users=4000, n_items=50, dim=64)
    params = freedom.init_params(jax.random.PRNGKey(0), net,
                                 rng.standard_normal((50, 300)).astype(np.float32), None)
    assert 'text_trs' not in params and 'text_embedding' not in params
    # xavier_uniform_: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    users = np.asarray(params['user_embedding'])
    bound = np.sqrt(6 / (4000 + 64))
    assert users.shape == (4000, 64)
    assert np.abs(users).max() <= bound and np.abs(users).max() > 0.99 * bound
    assert users.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    # nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    kernel, bias = (np.asarray(params['image_trs'][k]) for k in ('kernel', 'bias'))
    bound = 1 / np.sqrt(300)
    assert kernel.shape == (300, 64) and bias.shape == (64,)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    assert np.abs(bias).max() <= bound


def test_place_frozen_keeps_features_off_the_devices(setup):
    s = setup
    assert s['host'].image is not None and s['host'].text is not None
    assert s['frozen'].image is None and s['frozen'].text is None
    chunked = freedom.place_frozen(s['host'], parallel.Partitioner(num_devices=1),
                                   Options('segment_sum', 4))
    assert isinstance(chunked.user_item, graph.ChunkedCoo)
    users, _ = forward(s['net'], s['params'], chunked.user_item, chunked.item_item)
    ref, _ = forward(s['net'], s['params'], s['frozen'].user_item, s['frozen'].item_item)
    assert close(users, ref, 1e-6)


def test_interface_state_and_dropout_zero(setup):
    s = setup
    m = freedom.MODEL
    assert m.name == 'freedom' and m.batch_kind == 'bpr'
    assert tuple(m.sweep_fields) == ('model.reg_weight',)
    assert m.host_init(s['cfg']) == {}
    assert m.epoch_schedule(s['cfg'], {}, 5) == ({}, {'reg_weight': 0.1})
    # dropout 0: no epoch input; the step trains on the full adjacency (the reference's
    # masked_adj = norm_adj).
    cfg0 = model_config(dropout=0.0)
    assert m.epoch_inputs(s['prepared'], cfg0, jax.random.PRNGKey(0), 0) is None
    assert freedom._train_graph(s['frozen'], None) is s['frozen'].user_item
    with pytest.raises(ValueError, match='model.dropout'):
        m.epoch_inputs(s['prepared'], model_config(dropout=0.95), jax.random.PRNGKey(0), 0)


def test_flops_count():
    cfg = model_config(dropout=0.8, knn_k=10)
    # propagation: 2*2*8*(1*7*10 + 2*2*int(100*0.2)); projections: 3*2*(2*4)*(10+5)*8
    expected = 4 * 8 * (70 + 2 * 2 * 19) + 6 * 8 * 15 * 8  # int(100 * 0.19999999999999996) = 19
    size = base.ProblemSize(N_USERS, 7, n_train=100, batch_size=4, feature_dims=(10, 5))
    assert freedom.flops_per_batch(cfg, size) == expected
    no_batch = size._replace(n_train=0, batch_size=0)
    assert freedom.flops_per_batch(cfg, no_batch) == 4 * 8 * 70


def test_short_training_lowers_the_loss(setup):
    """A new pruned graph every epoch (the interface's epoch_inputs), one Adam step each."""
    s = setup
    params, state = s['params'], ADAM.init(s['params'])
    values = []
    for epoch in range(30):
        pruned = freedom.epoch_inputs(s['prepared'], s['cfg'], jax.random.PRNGKey(epoch), epoch)
        value, grads = loss_and_grads(s['net'], params, s['batch'], s['frozen'], pruned, 0.1)
        params, state = adam_step(params, grads, state, 0.05)
        values.append(float(value))
    assert np.isfinite(values).all() and values[-1] < 0.5 * values[0]


# ----------------------------------------------------------------------------------------------
# The pruning sampler
# ----------------------------------------------------------------------------------------------

def test_keep_count_truncates_like_the_reference():
    assert freedom.keep_count(10, 0.8) == 1  # 10 * 0.19999999999999996 = 1.9999999999999996
    assert freedom.keep_count(10, 0.5) == 5
    assert freedom.keep_count(118551, 0.8) == 23710  # Amazon Baby's training rows
    assert freedom.keep_count(118551, 0.9) == 11855


def test_kept_subgraph_renormalised_with_its_own_degrees():
    """Users 0, 1; items 0, 1, 2; edges (0,0), (0,1), (1,1), (1,2). Keeping two of them, worked
    out by hand: two edges sharing a node get 1/sqrt(2) each, two disjoint edges 1 each."""
    users, items = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])
    hand = {frozenset({(0, 0), (0, 1)}): 2 ** -0.5, frozenset({(0, 0), (1, 1)}): 1.0,
            frozenset({(0, 0), (1, 2)}): 1.0, frozenset({(0, 1), (1, 1)}): 2 ** -0.5,
            frozenset({(0, 1), (1, 2)}): 1.0, frozenset({(1, 1), (1, 2)}): 2 ** -0.5}
    ds = MMRecDataset('hand', 2, 3, Interactions(users.astype(np.int32), items.astype(np.int32)),
                      None, None, np.eye(3, dtype=np.float32), None)
    prepared = freedom.prepare(ds)
    # Sampling weights with the full graph's degrees: user 0 and 1 have 2 edges, item 1 has 2.
    np.testing.assert_allclose(np.asarray(prepared.edges.weights),
                               [2 ** -0.5, 0.5, 0.5, 2 ** -0.5], rtol=1e-6)
    seen = set()
    for seed in range(40):
        adj = freedom.epoch_inputs(prepared, model_config(dropout=0.5), jax.random.PRNGKey(seed), 0)
        assert adj.shape == (5, 5) and adj.nse == 4  # 2 kept edges, mirrored
        idx, val = np.asarray(adj.indices), np.asarray(adj.data)
        kept = frozenset((int(r), int(c) - 2) for r, c in idx[:2])
        assert len(kept) == 2
        np.testing.assert_allclose(val, hand[kept], rtol=1e-6)
        dense = np.asarray(adj.todense())
        np.testing.assert_array_equal(dense, dense.T)
        seen.add(kept)
    assert len(seen) >= 4  # the draws do vary


def exact_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """P(edge kept) under sequential weighted sampling without replacement, by enumerating
    every ordered draw."""
    w = np.asarray(weights, np.float64)
    p = np.zeros(w.size)
    for seq in itertools.permutations(range(w.size), k):
        prob, left = 1.0, w.sum()
        for e in seq:
            prob *= w[e] / left
            left -= w[e]
        p[list(seq)] += prob
    return p


def test_inclusion_frequencies_follow_sequential_sampling():
    # Distinct edges with unequal degrees: weights 1/sqrt(d_u d_i) from 1/sqrt(6) to 1.
    users = np.array([0, 1, 1, 1, 2, 3], np.int32)
    items = np.array([0, 0, 1, 2, 2, 3], np.int32)
    edges = graph.train_edges(users, items, 4, 4)
    w = np.asarray(edges.weights, np.float64)
    k, draws = 3, 10000
    exact = exact_inclusion(w, k)

    def kept_edges(key):
        adj = graph.edge_dropout_adjacency(key, edges, k, 4, 4)
        return adj.indices[:k, 0] * 4 + adj.indices[:k, 1] - 4

    codes = np.asarray(jax.jit(jax.vmap(kept_edges))(
        jax.random.split(jax.random.PRNGKey(0), draws)))
    ours = np.stack([(codes == u * 4 + i).any(1) for u, i in zip(users, items)], 1).mean(0)
    rng = np.random.default_rng(0)
    counts = np.zeros(w.size)
    for _ in range(draws):
        counts[rng.choice(w.size, k, replace=False, p=w / w.sum())] += 1
    numpy_freq = counts / draws
    # Binomial standard error <= sqrt(0.25 / 10000) = 0.005; 0.02 is 4 of them.
    np.testing.assert_allclose(ours, exact, atol=0.02)
    np.testing.assert_allclose(numpy_freq, exact, atol=0.02)
    np.testing.assert_allclose(ours, numpy_freq, atol=0.025)
    # The test can fail: inclusion proportional to the weights (k * w / sum w) is not it
    # (0.79 instead of 0.69 for the edge of weight 1).
    assert np.abs(k * w / w.sum() - exact).max() > 0.09
    assert np.abs(ours - k * w / w.sum()).max() > 0.05


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def point_model(cfg) -> ml_collections.ConfigDict:
    """The model section of one grid point (tuples -> their first value)."""
    return ml_collections.ConfigDict({k: v[0] if isinstance(v, tuple) else v
                                      for k, v in cfg.model.to_dict().items()})


@pytest.mark.parametrize('variant', ['synthetic', *freedom_configs.MMREC_DATASETS])
def test_config_variants_pass_the_checks(variant):
    cfg = freedom_configs.get_config(variant)
    assert cfg.model_name == 'freedom'
    for forbidden in ('decay_weight', 'decay_base', 'transposed_features'):
        assert forbidden not in cfg.model
    whole = ml_collections.ConfigDict({'model': point_model(cfg), 'train': cfg.train.to_dict()})
    assert [f for ok, f, _ in freedom.config_checks(whole, 100, 50) if not ok] == []
    if variant != 'synthetic':
        assert cfg.model.dropout == (0.8, 0.9)
        assert cfg.model.reg_weight == (0.0, 1e-05, 1e-04, 1e-03)
        assert cfg.hyper_parameters == ('model.dropout', 'model.reg_weight', 'train.seed')
    with pytest.raises(ValueError, match='unknown config variant'):
        freedom_configs.get_config('babyy')


@pytest.mark.parametrize('field,value', [
    ('dropout', 1.0), ('dropout', -0.1), ('knn_k', 0), ('knn_k', 51), ('mm_image_weight', 1.5),
    ('n_ui_layers', -1), ('n_mm_layers', -1), ('embedding_size', 0), ('reg_weight', -1e-4)])
def test_config_checks_name_the_bad_field(field, value):
    m = point_model(freedom_configs.get_config('baby'))
    m[field] = value
    whole = ml_collections.ConfigDict({'model': m})
    failed = [(f, expected) for ok, f, expected in freedom.config_checks(whole, 100, 50)
              if not ok]
    assert [f for f, _ in failed] == [f'model.{field}']
    # The message the trainer builds from a failed check names the field and its value.
    f, expected = failed[0]
    message = f'config field {f} = {m[field]!r}; expected {expected}'
    assert f'model.{field} = {value!r}' in message


# ----------------------------------------------------------------------------------------------
# Through the generic trainer
# ----------------------------------------------------------------------------------------------

def small_point(**model):
    from lirdrec_jax import grid
    cfg = freedom_configs.get_config('synthetic')
    cfg.model.embedding_size, cfg.model.knn_k = 16, 5
    cfg.optim.learning_rate = (0.005,)
    cfg.train.epochs, cfg.train.stopping_step, cfg.train.batch_size = 4, 10, 256
    cfg.eval.batch_size = 128
    for k, v in model.items():
        cfg.model[k] = v
    return grid.expand_grid(cfg)[0].config


@pytest.fixture(scope='module')
def trainer_data():
    from lirdrec_jax import train
    from tests.test_train import tiny_dataset
    return train.prepare_data(tiny_dataset(), 'freedom')


def test_trainer_resumes_to_the_uninterrupted_run(trainer_data, tmp_path, training_log):
    from lirdrec_jax import train
    point = small_point()
    full = train.train_and_evaluate(point, trainer_data, tmp_path / 'full')
    part = train.train_and_evaluate(point, trainer_data, tmp_path / 'r', stop_after_epochs=2)
    assert part['epochs_done'] == 2 and not part['finished']
    training_log.clear()
    resumed = train.train_and_evaluate(point, trainer_data, tmp_path / 'r', resume=True)
    assert training_log.epoch_numbers == [2, 3]  # from the checkpoint, not from scratch
    losses = [h['loss'] for h in full['history']]
    assert [h['loss'] for h in resumed['history']] == losses  # same pruned graphs per epoch
    assert resumed['best_valid'] == full['best_valid']
    assert losses[-1] < losses[0]


def test_vmapped_reg_weights_equal_each_point_alone(trainer_data, tmp_path, training_log):
    from lirdrec_jax import sweep, train
    points = [small_point(reg_weight=(w,)) for w in (0.0, 0.01)]
    for p in points:
        p.train.epochs = 3
    together = sweep.train_group(points, trainer_data, [tmp_path / 'a', tmp_path / 'b'])
    assert training_log.epochs == [(0, 2), (1, 2), (2, 2)]  # both points in one program
    for point, result in zip(points, together):
        alone = train.train_and_evaluate(point, trainer_data, tmp_path / str(point.model.reg_weight))
        np.testing.assert_allclose([h['loss'] for h in result['history']],
                                   [h['loss'] for h in alone['history']], rtol=1e-5)
    # The reg weight reaches the step per point: the two losses differ.
    assert together[0]['history'][0]['loss'] != together[1]['history'][0]['loss']


# ----------------------------------------------------------------------------------------------
# model.matmul_dtype = 'bfloat16'
# ----------------------------------------------------------------------------------------------

def bfloat16_point(**model):
    """`small_point` with a feature weight large enough that the projections' rounding shows in
    the loss (at the synthetic config's 1e-3 the loss is the same float32 number)."""
    return small_point(reg_weight=(1.0,), **model)


def test_bfloat16_runs_the_feature_projections_in_bfloat16(trainer_data):
    """'float32' is the program without the field, bit for bit; 'bfloat16' runs both feature
    projections with bfloat16 operands and float32 results: forward, kernel gradient and,
    since the feature tables are trainable parameters, the gradient of the gathered rows."""
    runs = first_steps_by_dtype(bfloat16_point, trainer_data)

    rows, d = 2 * 256, 16  # a batch's positives and negatives; the embedding size
    want = []
    for f in (12, 6):  # the image and text widths of the dataset
        want += [
            (hlo_type(rows, f, 'bf16'), hlo_type(f, d, 'bf16'), hlo_type(rows, d, 'f32')),
            (hlo_type(rows, f, 'bf16'), hlo_type(rows, d, 'bf16'), hlo_type(f, d, 'f32')),
            # the gathered rows' gradient (the feature tables train)
            (hlo_type(rows, d, 'bf16'), hlo_type(d, f, 'bf16'), hlo_type(rows, f, 'f32'))]
    assert bfloat16_dots(runs['bfloat16'][0]) == sorted(want)
    # Measured: 2.5e-3 norm-wise, at most 3.8e-3 on a leaf (the image projection's kernel).
    assert_close_not_equal(runs['float32'][1:], runs['bfloat16'][1:])


def test_bfloat16_keeps_the_feature_tables_float32_parameters(trainer_data):
    """Only the gathered rows are rounded, in the step: the tables are initialised from the
    float32 features as they are, kept off the devices as frozen inputs, and the kNN graph is
    the same."""
    from lirdrec_jax import train
    prepared = trainer_data.model
    f32 = freedom.frozen_inputs(prepared, None, bfloat16_point().model)
    cfg = bfloat16_point(matmul_dtype='bfloat16')
    bf16 = freedom.frozen_inputs(prepared, None, cfg.model)
    assert bf16.image is prepared.image and bf16.text is prepared.text
    np.testing.assert_array_equal(bf16.item_item.todense(), f32.item_item.todense())
    s = train.setup_point(cfg, trainer_data, parallel.Partitioner(num_devices=1))
    assert s.net.matmul_dtype == 'bfloat16'
    assert s.frozen.image is None and s.frozen.text is None
    for m in ('image', 'text'):
        table = s.state.params[f'{m}_embedding']
        assert table.dtype == jnp.float32
        np.testing.assert_array_equal(table, getattr(prepared, m))
    assert {x.dtype for x in jax.tree.leaves(s.state.params)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_training_stays_close(trainer_data, tmp_path):
    assert_training_close(lambda dtype: bfloat16_point(matmul_dtype=dtype), trainer_data,
                          tmp_path)


def test_config_checks_name_matmul_dtype():
    m = point_model(freedom_configs.get_config('baby'))
    assert_matmul_dtype_checks(freedom.config_checks, ml_collections.ConfigDict({'model': m}),
                               100, 50)
