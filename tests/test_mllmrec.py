"""MLLMRec (lirdrec_jax/models/mllmrec.py): its item graph on a hand-made interaction set
worked out on paper (the float32 "diagonal" quirk and the `pure` threshold included), the sparse
build against a dense restatement, e, the loss by hand, the towers and gradients against an
independent PyTorch statement (tests/torch_mllmrec.py), config checks, and short runs through the
generic trainer (one that learns; a vmapped sweep over the graph's settings)."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip('torch')

from configs import mllmrec as mllmrec_configs  # noqa: E402
from lirdrec_jax import graph, model_inputs  # noqa: E402
from lirdrec_jax.models import base, mllmrec  # noqa: E402
from tests import torch_mllmrec as T  # noqa: E402
from tests.mixed_precision import (assert_close_not_equal, assert_training_close,  # noqa: E402
                                   assert_matmul_dtype_checks, bfloat16_dots,
                                   first_steps_by_dtype, tensor)

# ----------------------------------------------------------------------------------------------
# The item graph on paper
# ----------------------------------------------------------------------------------------------

# 5 items, 4 users. Training users per item:
#   item 0: {0, 1}   item 1: {0, 1}   (the same two users: Jaccard exactly 1 -> zeroed)
#   item 2: {2}      item 3: {2}      (one user each, the same one: 1/(1 + 1e-7) in float32)
#   item 4: {0, 3}                    (shares user 0 with items 0 and 1: 1 / |{0, 1, 3}| = 1/3)
PAPER_USERS = np.array([0, 1, 0, 1, 2, 2, 0, 3])
PAPER_ITEMS = np.array([0, 0, 1, 1, 2, 3, 4, 4])
# Unit vectors at these angles: cos(0 deg, 10 deg) = 0.985, cos(45, 10) = 0.819 (item 4's
# nearest other item), cos(90, 100) = 0.985.
PAPER_ANGLES = np.deg2rad([0.0, 10.0, 90.0, 100.0, 45.0])
PAPER_FEATURES = np.stack([np.cos(PAPER_ANGLES), np.sin(PAPER_ANGLES)], 1).astype(np.float32)
ONE_USER = float(np.float32(1.0) / (np.float32(1.0) + np.float32(1e-7)))  # 0.99999988
THIRD = float(np.float32(1.0) / np.float32(3.0))


def test_jaccard_values_keep_the_single_user_self_loop():
    inter = np.array([1, 2, 3, 1, 1, 0])
    union = np.array([1, 2, 3, 3, 1, 5])
    jac = mllmrec.jaccard_values(inter, union)
    assert jac.dtype == np.float32
    # 1/(1 + 1e-7) rounds to 0.99999988 != 1 in float32 and survives the `== 1` removal;
    # 2/(2 + 1e-7) and 3/(3 + 1e-7) are exactly 1 in float32 and are removed.
    np.testing.assert_array_equal(jac, np.float32([ONE_USER, 0.0, 0.0, THIRD, ONE_USER, 0.0]))
    assert ONE_USER != 1.0


def test_jaccard_knn_graph_on_paper():
    j1 = mllmrec.jaccard_knn_graph(PAPER_USERS, PAPER_ITEMS, 4, 5, 1).toarray()
    expected = np.zeros((5, 5))
    expected[0, 4] = expected[1, 4] = THIRD     # (0, 1) and the diagonal are exactly 1: removed
    expected[2, 2] = ONE_USER                   # ties (2, 2) = (2, 3): the lower index
    expected[3, 2] = ONE_USER                   # ties (3, 2) = (3, 3): the lower index
    expected[4, 0] = THIRD                      # ties (4, 0) = (4, 1): the lower index
    np.testing.assert_array_equal(j1, expected)
    j2 = mllmrec.jaccard_knn_graph(PAPER_USERS, PAPER_ITEMS, 4, 5, 2).toarray()
    expected[2, 3] = expected[3, 3] = ONE_USER  # a pair whose only user is the same keeps 0.9999999
    expected[4, 1] = THIRD
    np.testing.assert_array_equal(j2, expected)


def test_pure_knn_graph_thresholds_the_top_k():
    b = mllmrec.pure_knn_graph(PAPER_FEATURES, 2, 0.9).toarray()
    expected = np.zeros((5, 5))
    for i, j in [(0, 0), (0, 1), (1, 1), (1, 0), (2, 2), (2, 3), (3, 3), (3, 2), (4, 4)]:
        expected[i, j] = 1.0
    # Item 4's second neighbour, item 1 (cosine 0.819), is below pure = 0.9: dropped.
    np.testing.assert_array_equal(b, expected)
    expected[4, 1] = 1.0
    np.testing.assert_array_equal(mllmrec.pure_knn_graph(PAPER_FEATURES, 2, 0.8).toarray(),
                                  expected)
    # pure is compared in float32, as torch compares a float32 tensor with a Python float: a
    # similarity equal to float32(pure) is kept although it is below pure in double.
    x = np.array([[1.0, 0.0], [np.float32(0.7), np.sqrt(1 - np.float32(0.7) ** 2)]], np.float32)
    sim = float(np.float32(x[1] @ x[0]) / np.float32(np.linalg.norm(x[1])))
    b = mllmrec.pure_knn_graph(x, 2, sim + 1e-12).toarray()
    assert sim + 1e-12 > sim and np.float32(sim + 1e-12) == np.float32(sim)
    assert b[0, 1] == 1.0


def test_item_graph_on_paper():
    s = mllmrec.item_graph(PAPER_FEATURES, PAPER_USERS, PAPER_ITEMS, 4, 5, knn_k=2, knn_jac=1,
                           pure=0.9).toarray()
    # B + J, row by row (B from the test above, J from knn_jac = 1):
    m = np.zeros((5, 5))
    m[0, 0], m[0, 1], m[0, 4] = 1, 1, THIRD
    m[1, 1], m[1, 0], m[1, 4] = 1, 1, THIRD
    m[2, 2], m[2, 3] = 1 + ONE_USER, 1
    m[3, 3], m[3, 2] = 1, 1 + ONE_USER
    m[4, 4], m[4, 0] = 1, THIRD
    r = m.sum(1)  # 7/3, 7/3, ~3, ~3, 4/3
    np.testing.assert_allclose(s, m / np.sqrt(r[:, None] * r[None, :]), rtol=1e-12)
    # A few entries by hand: S_00 = 1/(7/3), S_04 = (1/3)/sqrt(7/3 * 4/3) = 1/sqrt(28) = S_40,
    # S_44 = 1/(4/3); S is not symmetric (S_14 != S_41 = 0).
    assert s[0, 0] == pytest.approx(3 / 7, rel=1e-7)
    assert s[0, 4] == pytest.approx(1 / np.sqrt(28), rel=1e-7) == s[4, 0]
    assert s[4, 4] == pytest.approx(3 / 4, rel=1e-7)
    assert s[1, 4] > 0 and s[4, 1] == 0
    # Single-user items keep their Jaccard self-loop on top of B's: S_22 = 1.9999999 / r_2.
    assert s[2, 2] == pytest.approx((1 + ONE_USER) / (2 + ONE_USER), rel=1e-7)


def test_sym_norm_by_row_sums_zero_rows_and_their_columns():
    # Row 2 sums to 0: its inverse square root (inf) is 0, so column 2's entries vanish too.
    m = sp.csr_matrix(np.array([[1.0, 1.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    s = graph.sym_norm_by_row_sums(m)
    expected = np.array([[1 / 4, 1 / np.sqrt(4 * 3), 0], [0, 1.0, 0], [0, 0, 0]])
    np.testing.assert_allclose(s.toarray(), expected, rtol=1e-12)
    assert s.nnz == 3  # the zeroed (0, 2) entry is not stored


def test_top_k_per_row_ties_to_the_lower_column():
    m = sp.csr_matrix(np.array([[0.5, 0.2, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]))
    np.testing.assert_array_equal(graph.top_k_per_row(m, 2).toarray(),
                                  [[0.5, 0, 0, 0.9], [0, 0, 0, 0], [0.3, 0.3, 0, 0]])


# ----------------------------------------------------------------------------------------------
# The sparse build against the dense restatement
# ----------------------------------------------------------------------------------------------

def random_case(seed=0, n_users=40, n_items=30, n_rows=160, dim=6):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_rows)
    # Popular low-numbered items, so that Jaccard values tie and rows have many co-occurrences.
    items = np.minimum(rng.geometric(0.12, n_rows) - 1, n_items - 2)  # item n_items-1: no user
    factors = rng.standard_normal((n_items, 3))
    features = (factors @ rng.standard_normal((3, dim))
                + 0.3 * rng.standard_normal((n_items, dim))).astype(np.float32)
    return users, items, n_users, n_items, features


@pytest.mark.parametrize('knn_k,knn_jac,pure', [(5, 4, 0.5), (3, 10, 0.2), (8, 2, 0.9)])
def test_sparse_graph_equals_the_dense_restatement(knn_k, knn_jac, pure):
    users, items, n_users, n_items, features = random_case()
    ours = mllmrec.item_graph(features, users, items, n_users, n_items, knn_k, knn_jac, pure)
    dense = T.dense_item_graph(torch.from_numpy(features), users, items, n_users, n_items,
                               knn_k, knn_jac, pure).numpy()
    np.testing.assert_array_equal(ours.toarray() != 0, dense != 0)
    np.testing.assert_allclose(ours.toarray(), dense, rtol=1e-6, atol=0)
    # Must fail: the diagonal removed exactly (single-user items lose their self-loop).
    wrong = T.dense_item_graph(torch.from_numpy(features), users, items, n_users, n_items,
                               knn_k, knn_jac, pure, exact_diagonal=True).numpy()
    assert not np.allclose(ours.toarray(), wrong, rtol=1e-6, atol=0)


def test_jaccard_blocks_do_not_change_the_graph():
    users, items, n_users, n_items, _ = random_case(seed=1)
    one = mllmrec.jaccard_knn_graph(users, items, n_users, n_items, 5)
    assert len(mllmrec._path_blocks(mllmrec.item_user_counts(users, items, n_users, n_items),
                                    40)) > 3
    many = mllmrec.jaccard_knn_graph(users, items, n_users, n_items, 5, block_paths=40)
    assert (one != many).nnz == 0 and one.nnz > 0


def test_repeated_training_rows_count_like_the_dense_counts():
    # (user 0, item 0) twice: counts 2 in the item's row, as the reference's dense toarray().
    users, items = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 1, 1])
    ours = mllmrec.jaccard_knn_graph(users, items, 3, 2, 2).toarray()
    dense = T.stable_topk_scatter(T.dense_jaccard(users, items, 3, 2), 2).numpy()
    np.testing.assert_array_equal(ours, np.where(dense > 0, dense, 0))


def test_item_inputs_sum_the_layers():
    s = sp.csr_matrix(np.array([[0.5, 0.5], [0.0, 1.0]]))
    f = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    # L = 1: e = F + S F; L = 2: + S^2 F; L = 0: F. Blocks of 2 columns split the 3 columns.
    sf = np.array([[2.5, 3.5, 4.5], [4.0, 5.0, 6.0]])
    ssf = np.array([[3.25, 4.25, 5.25], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(mllmrec.item_inputs(s, f, 1, block_cols=2), f + sf)
    np.testing.assert_array_equal(mllmrec.item_inputs(s, f, 2, block_cols=2), f + sf + ssf)
    np.testing.assert_array_equal(mllmrec.item_inputs(s, f, 0), f)
    assert mllmrec.item_inputs(s, f, 1).dtype == np.float32


# ----------------------------------------------------------------------------------------------
# The towers and the loss
# ----------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    users: jax.Array
    positives: jax.Array
    negatives: jax.Array
    weights: jax.Array


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(net, params, batch, frozen):
    return jax.value_and_grad(lambda p: mllmrec.MODEL.loss(net, p, (), batch, frozen, None, {},
                                                          None)[0])(params)


def test_loss_by_hand():
    # dim 1 (hidden 4), one input column; kernels and biases chosen so the towers are short.
    net = mllmrec.MLLMRecNet(dim=1)
    tower = lambda w1, b1, w2, b2: {'hidden': {'kernel': jnp.array([w1], jnp.float32),
                                               'bias': jnp.array(b1, jnp.float32)},
                                    'out': {'kernel': jnp.array(w2, jnp.float32)[:, None],
                                            'bias': jnp.array([b2], jnp.float32)}}
    params = {'item_tower': tower([1, -1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], 0.5),
              'user_tower': tower([2, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], -1.0)}
    items = jnp.array([[2.0], [-3.0], [1.0]])
    users = jnp.array([[1.0], [0.5]])
    # h_i = leaky(x) + leaky(-x) + 0.5: item 0: 2 - 0.02 + 0.5 = 2.48; item 1: -0.03 + 3 + 0.5
    # = 3.47; item 2: 1 - 0.01 + 0.5 = 1.49. h_u = leaky(2u) - 1: user 0: 1.0, user 1: 0.0.
    h_u, h_i = net.apply({'params': params}, items, users)
    np.testing.assert_allclose(np.asarray(h_i).ravel(), [2.48, 3.47, 1.49], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(h_u).ravel(), [1.0, 0.0], atol=1e-7)
    # Rows (u0, i0, i1): margin 1.0 * (2.48 - 3.47) = -0.99; (u1, i2, i0): margin 0;
    # a padding row (weight 0) is ignored.
    batch = Batch(jnp.array([0, 1, 0]), jnp.array([0, 2, 2]), jnp.array([1, 0, 1]),
                  jnp.array([1.0, 1.0, 0.0]))
    expected = (np.log1p(np.exp(0.99)) + np.log(2.0)) / 2
    value, _ = loss_and_grads(net, params, batch, mllmrec.Frozen(items, users))
    assert float(value) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope='module')
def torch_case():
    users, items, n_users, n_items, features = random_case(seed=2)
    s = mllmrec.item_graph(features, users, items, n_users, n_items, 5, 4, 0.5)
    e = mllmrec.item_inputs(s, features, 1)
    profile = np.random.default_rng(3).standard_normal((n_users, 5)).astype(np.float32)
    net = mllmrec.MLLMRecNet(dim=8)
    frozen = mllmrec.Frozen(jnp.asarray(e), jnp.asarray(profile))
    params, carry = mllmrec.init(jax.random.PRNGKey(0), net, frozen, frozen)
    rng = np.random.default_rng(4)
    batch = Batch(*(jnp.asarray(rng.integers(0, n, 12), jnp.int32)
                    for n in (n_users, n_items, n_items)), jnp.ones(12, jnp.float32))
    return net, params, frozen, batch


def torch_model(params, frozen, model_class=T.TorchMLLMRec, **kwargs):
    model = model_class(torch.from_numpy(np.array(frozen.items)),
                        torch.from_numpy(np.array(frozen.users)), 8, **kwargs)
    state = {}
    for ours, ref in (('item_tower', 'MLP'), ('user_tower', 'MLP_u')):
        for layer, suffix in (('hidden', ''), ('out', '_1')):
            state[f'{ref}{suffix}.weight'] = torch.tensor(np.asarray(
                params[ours][layer]['kernel']).T.copy())
            state[f'{ref}{suffix}.bias'] = torch.tensor(np.asarray(params[ours][layer]['bias']))
    model.load_state_dict(state, strict=True)
    return model


def test_forward_loss_and_gradients_match_torch(torch_case):
    net, params, frozen, batch = torch_case
    model = torch_model(params, frozen)
    h_u, h_i = mllmrec.MODEL.eval_embeddings(net, params, (), frozen, None, {}, 'last_batch')
    ref_u, ref_i = model.towers()
    np.testing.assert_allclose(h_u, ref_u.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_i, ref_i.detach().numpy(), rtol=1e-5, atol=1e-6)
    value, grads = loss_and_grads(net, params, batch, frozen)
    ref_loss = model.loss(*(torch.from_numpy(np.asarray(a, np.int64)) for a in batch[:3]))
    ref_loss.backward()
    assert float(value) == pytest.approx(ref_loss.item(), rel=1e-6)
    for ours, ref in (('item_tower', 'MLP'), ('user_tower', 'MLP_u')):
        for layer, suffix in (('hidden', ''), ('out', '_1')):
            g_w = getattr(model, f'{ref}{suffix}').weight.grad.numpy().T
            scale = np.abs(g_w).max()
            np.testing.assert_allclose(grads[ours][layer]['kernel'], g_w, atol=1e-5 * scale)
    # The item tower's output bias adds b.h_u to both scores of a row: its gradient is 0 up to
    # rounding on both sides (quirk entry); the user tower's is not.
    assert np.abs(np.asarray(grads['item_tower']['out']['bias'])).max() < 1e-6
    assert np.abs(np.asarray(grads['user_tower']['out']['bias'])).max() > 1e-3
    # Must fail: relu instead of leaky_relu (the hidden units with negative inputs differ).
    relu = torch_model(params, frozen, slope=0.0)
    assert not np.allclose(h_i, relu.towers()[1].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_init_distributions_are_nn_linear_defaults(torch_case):
    net, _, frozen, _ = torch_case
    params, carry = mllmrec.init(jax.random.PRNGKey(5), net, frozen, frozen)
    assert carry == ()
    k = np.asarray(params['item_tower']['hidden']['kernel'])
    bound = 1 / np.sqrt(frozen.items.shape[1])
    assert k.shape == (frozen.items.shape[1], 32) and np.abs(k).max() <= bound
    assert np.abs(k).max() > 0.8 * bound  # uniform over the whole range
    out = np.asarray(params['user_tower']['out']['bias'])
    assert out.shape == (8,) and np.abs(out).max() <= 1 / np.sqrt(32)


# ----------------------------------------------------------------------------------------------
# Interface, inputs and configuration
# ----------------------------------------------------------------------------------------------

def small_dataset(n_users=60, n_items=70, seed=0):
    from tests.test_train import tiny_dataset
    ds = tiny_dataset(seed, n_users, n_items)
    return model_inputs.with_no_llm_inputs(ds, mllmrec.MODEL.input_files)


def test_prepare_reads_the_input_files_and_names_the_missing_one():
    ds = small_dataset()
    p = mllmrec.prepare(ds)
    np.testing.assert_array_equal(p.items, ds.extra['image_text_file'])
    assert p.users.shape == (60, 6)
    with pytest.raises(ValueError, match='data.user_profile_file'):
        mllmrec.prepare(ds._replace(extra={'image_text_file': p.items}))
    zero = p.items.copy()
    zero[3] = 0
    with pytest.raises(ValueError, match='row 3 of the item input file'):
        mllmrec.prepare(ds._replace(extra={**ds.extra, 'image_text_file': zero}))
    with pytest.raises(ValueError, match=r'shape \(69, 6\)'):
        mllmrec.prepare(ds._replace(extra={**ds.extra, 'image_text_file': p.items[:69]}))


def test_interface_and_flops():
    m = mllmrec.MODEL
    assert m.name == 'mllmrec' and m.batch_kind == 'bpr'
    assert [f.field for f in m.input_files] == ['image_text_file', 'user_profile_file']
    assert [f.rows for f in m.input_files] == ['items', 'users']
    assert m.epoch_schedule(None, {}, 3) == ({}, {})
    cfg = ml_collections.ConfigDict({'feat_embed_dim': 2})
    size = base.ProblemSize(10, 7, n_train=100, batch_size=3, feature_dims=(11, 5))
    # Per row of width d: 4 (8 d + 16) + 2 * 16; items 2 * 3 rows, users 3 rows, d = 5 (the
    # text width, the no-LLM inputs' width).
    per_row = 4 * (8 * 5 + 16) + 32
    assert m.flops_per_batch(cfg, size) == 9 * per_row


def point_model(cfg) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: v[0] if isinstance(v, tuple) else v
                                      for k, v in cfg.model.to_dict().items()})


@pytest.mark.parametrize('variant', ['synthetic', *mllmrec_configs.MMREC_DATASETS])
def test_config_variants(variant):
    cfg = mllmrec_configs.get_config(variant)
    assert cfg.model_name == 'mllmrec' and cfg.optim.learning_rate == (0.001,)
    assert cfg.data.image_text_file == 'image_text_feat.npy'
    assert cfg.data.user_profile_file == 'user_preferences_feat.npy'
    assert cfg.hyper_parameters == ('model.feat_embed_dim', 'model.knn_jac', 'model.pure',
                                    'train.seed')
    whole = ml_collections.ConfigDict({'model': point_model(cfg)})
    assert [f for ok, f, _ in mllmrec.config_checks(whole, 100, 50) if not ok] == []
    expected = {'synthetic': (10, 0.7), 'baby': (10, 0.7), 'sports': (10, 0.4),
                'clothing': (15, 0.6)}.get(variant)
    if expected:
        assert (cfg.model.knn_jac[0], cfg.model.pure[0]) == expected


@pytest.mark.parametrize('field,value', [('pure', 0.0), ('pure', 1.5), ('knn_k', 0),
                                         ('knn_jac', 51), ('n_ii_layers', -1),
                                         ('feat_embed_dim', 0)])
def test_config_checks_name_the_bad_field(field, value):
    m = point_model(mllmrec_configs.get_config('baby'))
    m[field] = value
    failed = [f for ok, f, _ in mllmrec.config_checks(ml_collections.ConfigDict({'model': m}),
                                                      100, 50) if not ok]
    assert failed == [f'model.{field}']


# ----------------------------------------------------------------------------------------------
# Through the generic trainer
# ----------------------------------------------------------------------------------------------

def small_point(**model):
    from lirdrec_jax import grid
    cfg = mllmrec_configs.get_config('synthetic')
    cfg.model.feat_embed_dim, cfg.model.knn_k = (16,), 5
    cfg.model.pure = (0.3,)
    cfg.optim.learning_rate = (0.01,)
    cfg.train.epochs, cfg.train.stopping_step, cfg.train.batch_size = 12, 20, 64
    cfg.eval.batch_size = 64
    for k, v in model.items():
        cfg.model[k] = v
    return grid.expand_grid(cfg)[0].config


@pytest.fixture(scope='module')
def trainer_data():
    from lirdrec_jax import train
    return train.prepare_data(small_dataset(), 'mllmrec')


def test_short_training_learns(trainer_data, tmp_path):
    from lirdrec_jax import evaluation, train
    result = train.train_and_evaluate(small_point(), trainer_data, tmp_path)
    losses = [h['loss'] for h in result['history']]
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]
    ds = trainer_data.dataset
    popular = evaluation.evaluate_popularity(ds.train.items, ds.n_items, trainer_data.valid,
                                             metrics=('recall',), ks=(20,))
    assert result['best_valid']['recall@20'] > popular['recall@20'] + 0.05


def test_vmapped_graph_settings_equal_each_point_alone(trainer_data, tmp_path, training_log):
    from lirdrec_jax import sweep, train
    points = [small_point(pure=(p,), knn_jac=(j,)) for p, j in ((0.3, 10), (0.9, 3))]
    for p in points:
        p.train.epochs = 2
    together = sweep.train_group(points, trainer_data, [tmp_path / 'a', tmp_path / 'b'])
    assert training_log.epochs == [(0, 2), (1, 2)]  # both points in one program
    for i, (point, result) in enumerate(zip(points, together)):
        alone = train.train_and_evaluate(point, trainer_data, tmp_path / str(i))
        np.testing.assert_allclose([h['loss'] for h in result['history']],
                                   [h['loss'] for h in alone['history']], rtol=1e-5)
    # The graph settings reach the step per point (through e): the losses differ.
    assert together[0]['history'][0]['loss'] != together[1]['history'][0]['loss']


# ----------------------------------------------------------------------------------------------
# model.matmul_dtype = 'bfloat16'
# ----------------------------------------------------------------------------------------------

def test_bfloat16_runs_both_first_layers_in_bfloat16(trainer_data):
    """'float32' is the program without the field, bit for bit; 'bfloat16' runs the towers'
    first layers (forward and kernel gradient) with bfloat16 operands and float32 results, and
    stays close to float32."""
    runs = first_steps_by_dtype(small_point, trainer_data)

    b, f, p, h = 64, 6, 6, 4 * 16  # batch, e's and P's widths, hidden width
    assert bfloat16_dots(runs['bfloat16'][0]) == sorted([
        # item rows (positives and negatives interleaved), then their kernel gradient
        (tensor(2 * b, f, 'bf16'), tensor(f, h, 'bf16'), tensor(2 * b, h, 'f32')),
        (tensor(2 * b, f, 'bf16'), tensor(2 * b, h, 'bf16'), tensor(f, h, 'f32')),
        # user rows, then their kernel gradient (e and P are constants: no input gradient)
        (tensor(b, p, 'bf16'), tensor(p, h, 'bf16'), tensor(b, h, 'f32')),
        (tensor(b, p, 'bf16'), tensor(b, h, 'bf16'), tensor(p, h, 'f32'))])
    assert_close_not_equal(runs['float32'][1:], runs['bfloat16'][1:])


def test_bfloat16_stores_e_and_p_in_bfloat16(trainer_data):
    from lirdrec_jax import parallel, train
    f32 = mllmrec.frozen_inputs(trainer_data.model, None, small_point().model)
    assert f32.users is trainer_data.model.users  # float32: as prepared, no copy
    cfg = small_point(matmul_dtype='bfloat16')
    bf16 = mllmrec.frozen_inputs(trainer_data.model, None, cfg.model)
    for a, b in zip(f32, bf16):
        assert a.dtype == np.float32 and b.dtype == jnp.bfloat16 and 2 * b.nbytes == a.nbytes
        np.testing.assert_array_equal(b, a.astype(jnp.bfloat16))  # rounded once, from e and P
    placed = train.setup_point(cfg, trainer_data, parallel.Partitioner(num_devices=1)).frozen
    assert [x.dtype for x in placed] == [jnp.bfloat16] * 2


def test_bfloat16_training_stays_close(trainer_data, tmp_path):
    assert_training_close(lambda dtype: small_point(matmul_dtype=dtype), trainer_data, tmp_path)


def test_config_checks_name_matmul_dtype():
    m = point_model(mllmrec_configs.get_config('baby'))
    assert_matmul_dtype_checks(mllmrec.config_checks, ml_collections.ConfigDict({'model': m}),
                               100, 50)
